"""Weak secrets: short, digits only, the user name again, or a well-known password.

Findings name the entry and the reason, never the secret itself."""

from __future__ import annotations

from functools import cache
from importlib import resources

from tm4.asterisk.audit.finding import Finding, make
from tm4.asterisk.audit.pbx import Pbx, Secret

MIN_LENGTH = 12


@cache
def common_passwords() -> frozenset[str]:
    """The list shipped in tm4/data/common_passwords.txt (lower case, one a line)."""
    text = resources.files("tm4").joinpath("data/common_passwords.txt").read_text(encoding="utf-8")
    return frozenset(ln.strip().lower() for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))


def weaknesses(secret: Secret) -> list[str]:
    """Check ids that apply, worst first."""
    v = secret.value
    out = []
    if v == "":
        return ["secret-empty"]
    low = v.lower()
    if low in common_passwords():
        out.append("secret-common")
    if low in {secret.username.lower(), secret.name.lower()} or (
            len(v) >= 3 and (low in secret.name.lower() or secret.name.lower() in low)):
        out.append("secret-matches-name")
    if v.isdigit():
        out.append("secret-digits")
    if len(v) < MIN_LENGTH:
        out.append("secret-short")
    return out


_WHY = {
    "secret-empty": "it is empty: anyone who knows the name is in",
    "secret-common": "it is in the list of common passwords every SIP scanner tries first",
    "secret-matches-name": "it repeats the user name or extension, the first guess of a brute-force tool",
    "secret-digits": "it is digits only: a tiny search space for an offline or online guesser",
    "secret-short": f"it is shorter than {MIN_LENGTH} characters",
}
_SEVERITY = {"secret-empty": "high", "secret-common": "high", "secret-matches-name": "high",
             "secret-digits": "medium", "secret-short": "medium"}


def check_secrets(pbx: Pbx) -> list[Finding]:
    out: list[Finding] = []
    for s in pbx.secrets:
        found = weaknesses(s)
        if not found:
            continue
        worst = found[0]
        sev = _SEVERITY[worst]
        if s.kind == "AMI user" and sev == "medium":
            sev = "high"  # a manager login can originate calls and run commands
        reasons = "; ".join(_WHY[f] for f in found)
        out.append(make(
            worst, sev, s.where, f"weak secret for {s.label}",
            f"The secret of {s.label} is weak: {reasons}. Stolen or guessed SIP/AMI credentials are "
            "how toll fraud starts: the attacker registers or logs in and places calls at your cost.",
            f"Set a random secret of at least 16 letters and digits for {s.label} "
            "(e.g. `openssl rand -base64 18`) and update the device that uses it.",
        ))
    return out
