"""The Asterisk manager interface: where it listens and who may do what from where."""

from __future__ import annotations

import ipaddress

from tm4.asterisk.audit.finding import Finding, make
from tm4.asterisk.audit.inputs import AsteriskFiles
from tm4.asterisk.confparse import Section

BROAD_WRITE = ("system", "command", "originate", "all")


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("yes", "true", "on", "1", "y", "t")


def _net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    addr, _, mask = text.strip().partition("/")
    try:
        if mask and not mask.isdigit():
            return ipaddress.ip_network(f"{addr}/{ipaddress.ip_address(mask)}", strict=False)
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None


def _loopback_only(s: Section) -> bool:
    """Denies everything and permits loopback only (deny=0.0.0.0/0 ... permit=127.0.0.1)."""
    denies = [n for o in s.get_all("deny") if (n := _net(o.value)) is not None]
    permits = [n for o in s.get_all("permit") if (n := _net(o.value)) is not None]
    return any(n.prefixlen == 0 for n in denies) and all(n.network_address.is_loopback for n in permits)


def _permits_anyone(s: Section) -> bool:
    if s.get_all("acl"):
        return False
    permits = [n for o in s.get_all("permit") if (n := _net(o.value)) is not None]
    if any(n.prefixlen == 0 for n in permits):
        return True
    return not s.get_all("deny") and not permits


def check_ami(files: AsteriskFiles, tm4_user: str) -> list[Finding]:
    conf = files.get("manager.conf")
    if conf is None:
        return []
    general = next((s for s in conf.sections if s.name == "general"), None)
    if general is None or not _truthy(general.get("enabled")):
        return []  # Asterisk's default: AMI off
    out: list[Finding] = []
    bind = (general.get("bindaddr") or "0.0.0.0").strip()
    try:
        public = not ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        public = True
    if public:
        opt = general.get_all("bindaddr")
        out.append(make(
            "ami-bind-public", "high", opt[-1].where if opt else general.where,
            f"AMI listens on {bind}, beyond loopback",
            f"manager.conf binds the manager interface to {bind}. AMI logins can originate calls and run "
            "shell commands; exposed, it is guessed at like SIP and its traffic is unencrypted.",
            "Set bindaddr=127.0.0.1 in manager.conf [general] (tm4 and local tools connect over loopback).",
        ))
    for s in conf.sections:
        if s.is_template or s.name == "general" or s.get("secret") is None:
            continue
        if _permits_anyone(s):
            out.append(make(
                "ami-permit-any", "high" if public else "low", s.where,
                f"AMI user [{s.name}] may log in from any address",
                f"[{s.name}] has no deny/permit (or permits 0.0.0.0/0): its secret is the only protection"
                + (", and AMI listens beyond loopback." if public else
                   "; AMI listens on loopback only, so only local processes can try."),
                f"Add deny=0.0.0.0/0.0.0.0 and permit=127.0.0.1/255.255.255.255 (plus the hosts that need it) to [{s.name}].",
            ))
        write = {w.strip().lower() for w in (s.get("write") or "").split(",") if w.strip()}
        broad = sorted(write & set(BROAD_WRITE))
        if not broad or (s.name == tm4_user and write <= {"system"} and _loopback_only(s)):
            continue  # tm4's own user needs `system` for Reload, from loopback only
        out.append(make(
            "ami-broad-write", "low" if _loopback_only(s) else "medium", _write_where(s),
            f"AMI user [{s.name}] has broad write access ({', '.join(broad)})",
            f"[{s.name}] may use write classes {', '.join(broad)}: with them a login can originate calls "
            "(originate), run CLI and shell commands (command, system) or everything (all). A leaked secret "
            "then means full control of the PBX.",
            f"Give [{s.name}] only the write classes it needs (often none, or call/reporting).",
        ))
    return out


def _write_where(s: Section) -> str:
    opt = s.get_all("write")
    return opt[-1].where if opt else s.where
