"""`tm4 audit`: the security checklist as a command.

Pure: parsed Asterisk files and a snapshot of tm4's state in, findings out. One
module per family of checks (secrets, access, tollfraud, ami, tm4state); reading
lives in `inputs` and never leaves the directory it is given.
"""

from __future__ import annotations

from tm4.asterisk.audit.access import check_endpoint_acls, check_guest_access, check_named_acls
from tm4.asterisk.audit.ami import check_ami
from tm4.asterisk.audit.dialplan import read_dialplan
from tm4.asterisk.audit.finding import SEVERITIES, Finding, severity_rank
from tm4.asterisk.audit.inputs import (
    AsteriskFiles,
    EntryInfo,
    PasscodeInfo,
    Tm4State,
    load_asterisk,
)
from tm4.asterisk.audit.pbx import read_pbx
from tm4.asterisk.audit.secrets import check_secrets
from tm4.asterisk.audit.tm4state import check_includes, check_rtp, check_tm4
from tm4.asterisk.audit.tollfraud import check_call_limits, check_dialplan

__all__ = ["SEVERITIES", "AsteriskFiles", "EntryInfo", "Finding", "PasscodeInfo", "Tm4State", "audit",
           "at_least", "load_asterisk", "severity_rank"]

# Every check id the audit can report (tests prove each one).
CHECK_IDS = (
    "secret-empty", "secret-common", "secret-matches-name", "secret-digits", "secret-short",
    "endpoint-no-acl", "acl-undefined", "anonymous-reaches-trunk", "sip-allowguest",
    "sip-alwaysauthreject-off", "dialplan-wildcard-to-trunk", "dialplan-international",
    "trunk-no-call-limit", "ami-bind-public", "ami-permit-any", "ami-broad-write",
    "tm4-ssh-world", "tm4-public-service", "tm4-safe-mode-off", "tm4-passcode-unused",
    "tm4-dns-stale", "rtp-range-mismatch", "include-outside", "conf-adds-to-nothing",
)


def audit(files: AsteriskFiles, state: Tm4State) -> list[Finding]:
    """Every finding, worst first, then by file and line."""
    pbx = read_pbx(files)
    dp = read_dialplan(files.get("extensions.conf"))
    found = [
        *check_includes(files),
        *check_secrets(pbx),
        *check_endpoint_acls(pbx, state),
        *check_named_acls(pbx),
        *check_guest_access(pbx, dp),
        *check_dialplan(pbx, dp),
        *check_call_limits(pbx, dp),
        *check_ami(files, state.ami_username),
        *check_tm4(state),
        *check_rtp(files, state),
    ]
    return sorted(found, key=lambda f: (-severity_rank(f.severity), f.file, f.line or 0, f.id, f.title))


def at_least(findings: list[Finding], severity: str) -> list[Finding]:
    floor = severity_rank(severity)
    return [f for f in findings if severity_rank(f.severity) >= floor]
