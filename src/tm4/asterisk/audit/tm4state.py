"""tm4's own risks: SSH open to the world, services public that need not be, safe mode
off, passcodes nobody used for 90 days, DNS names whose addresses are stale; and an
RTP range that differs from Asterisk's."""

from __future__ import annotations

import ipaddress
from datetime import timedelta

from tm4.asterisk.audit.finding import Finding, make
from tm4.asterisk.audit.inputs import AsteriskFiles, Tm4State
from tm4.core.services import ALL, SIP_SERVICES

UNUSED_AFTER = timedelta(days=90)
# Services that may reasonably be public (then guarded): signalling from roaming phones.
MAY_BE_PUBLIC = {*SIP_SERVICES, "iax"}


def check_tm4(state: Tm4State) -> list[Finding]:
    out: list[Finding] = []
    cfg = state.config_file
    for e in state.entries:
        if e.expired or not ({"ssh", ALL} & set(e.services)):
            continue
        wide = [n for n in e.networks if ipaddress.ip_network(n, strict=False).prefixlen == 0]
        if wide:
            out.append(make(
                "tm4-ssh-world", "high", "tm4 store", f"entry {e.name} opens SSH to the whole internet",
                f"Entry {e.name} grants {', '.join(e.services)} to {', '.join(wide)}: SSH is then open to every "
                "scanner, which is what tm4 exists to prevent.",
                f"`tm4 del {e.name}` and whitelist the addresses you administer from "
                "(or use dial-in / knock to open SSH when you travel).",
            ))
    for svc in sorted(set(state.public_services) - MAY_BE_PUBLIC):
        out.append(make(
            "tm4-public-service", "high" if svc in (ALL, "ssh", "ami") else "medium", cfg,
            f"{svc} is public",
            f"firewall.public_services lists {svc!r}: it is open to everyone. Only SIP (and IAX) have a reason "
            "to be reachable by unknown addresses; everything else should come from whitelisted ones.",
            f"Remove {svc!r} from firewall.public_services and whitelist who needs it (`tm4 add NAME ADDRESS -s {svc}`).",
        ))
    if not state.safe_mode:
        out.append(make(
            "tm4-safe-mode-off", "low", cfg, "safe mode is off",
            "daemon.safe_mode = false: after a crash loop or a short boot tm4 will not fall back to opening "
            "your own SSH, so a bad rule set can lock you out of the server.",
            "Set daemon.safe_mode = true (the default).",
        ))
    for p in state.passcodes:
        last = p.last_used or p.created
        if state.now - last >= UNUSED_AFTER:
            days = (state.now - last).days
            out.append(make(
                "tm4-passcode-unused", "low", "tm4 store", f"dial-in passcode of {p.owner} unused for {days} days",
                f"The passcode of {p.owner} was last used {days} days ago"
                + ("" if p.last_used else " (never used since it was made)")
                + ". An unused passcode is a way in that nobody watches.",
                f"`tm4 passcode del {p.owner}` if it is no longer needed, else `tm4 passcode rotate {p.owner}`.",
            ))
    for e in state.entries:
        if e.stale and not e.expired:
            out.append(make(
                "tm4-dns-stale", "medium", "tm4 store", f"entry {e.name}: its DNS names no longer resolve",
                f"Entry {e.name} keeps the last known addresses of its DNS names because lookups fail. "
                "Those addresses may now belong to someone else, who is let in.",
                f"Check the name (`tm4 dns`), then fix it or `tm4 del {e.name}`.",
            ))
    return out


def check_rtp(files: AsteriskFiles, state: Tm4State) -> list[Finding]:
    conf = files.get("rtp.conf")
    if conf is None or state.rtp is None:
        return []
    general = next((s for s in conf.sections if s.name == "general"), None)
    if general is None:
        return []
    try:
        lo = int(general.get("rtpstart") or 5000)
        hi = int(general.get("rtpend") or 31000)
    except ValueError:
        return []
    flo, fhi = state.rtp
    covered = flo <= lo and hi <= fhi
    if covered and (fhi - flo) <= 2 * (hi - lo) + 100:
        return []
    opt = general.get_all("rtpstart")
    return [make(
        "rtp-range-mismatch", "low" if covered else "medium", opt[-1].where if opt else general.where,
        f"Asterisk uses RTP {lo}-{hi}, tm4 opens {flo}-{fhi}",
        f"rtp.conf uses ports {lo}-{hi} while tm4's firewall.rtp is {flo}-{fhi}: ports outside tm4's range "
        "lose their audio, and ports tm4 opens that Asterisk never uses are open for nothing.",
        f"Set firewall.rtp = \"{lo}-{hi}\" in tm4.toml (or change rtp.conf to match).",
    )]


def check_includes(files: AsteriskFiles) -> list[Finding]:
    out = []
    for note in files.notes:
        if "adds to a section that is not defined before it" in note:
            out.append(_adds_to_nothing(note))
        if "refused, not read" not in note:
            continue
        where, _, text = note.partition(": ")
        out.append(make(
            "include-outside", "medium", where, "an include points outside the Asterisk directory",
            f"{text}. Asterisk reads it, the audit does not: whatever it holds was not checked, and config "
            "outside /etc/asterisk is easy to overlook or for others to change.",
            "Move the included file into the Asterisk configuration directory, or audit that directory too.",
        ))
    return out


def _adds_to_nothing(note: str) -> Finding:
    """`[1001](+type=endpoint)` with no [1001] endpoint before it: Asterisk ignores it."""
    where, _, text = note.partition(": ")
    header = text.split(" adds to", 1)[0]
    tm4s = where.startswith("pjsip_tm4_endpoints.conf:")
    return make(
        "conf-adds-to-nothing", "medium", where, f"{header} adds to a section that does not exist before it",
        f"{header} adds to a section of that name and type, but none is defined before it. Asterisk ignores "
        "it with a WARNING (checked on Asterisk 22.10.1): what it adds, an endpoint's ACL for instance, is "
        "silently not applied, so that endpoint is not locked to its owner's addresses.",
        "Run `tm4 asterisk sync` (tm4 unties endpoints that are gone or defined after its #include), and keep "
        "tm4's #include line last in pjsip.conf." if tm4s else
        "Define the section before the line that adds to it, or remove the (+) section.",
    )

