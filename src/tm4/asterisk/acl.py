"""The whitelist as an Asterisk named ACL (`[tm4]` in acl_tm4.conf), kept in step;
and one named ACL per PJSIP endpoint an entry serves (`[tm4-1001]`: only the
addresses of the entries that name endpoint 1001), tied to the endpoint by an
include tm4 owns (pjsip_tm4_endpoints.conf: `[1001](+type=endpoint)` / `acl = tm4-1001`;
which endpoints may be tied, and untying them, is tm4.asterisk.ties).

In Asterisk's ACLs the LAST matching rule wins and an address no rule matches is
allowed, so the ACL denies every IPv4 and IPv6 address first and then permits the
whitelist (entries granting sip-udp, sip-tcp, sip-tls, iax or all). The file is
rewritten atomically when its content changes, then Asterisk is asked to
`Action: Reload` / `Module: acl` over AMI. When AMI is down the file is still
right and the reload stays pending until AMI answers again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tm4.asterisk.conffile import (
    ConfParseError,
    IncludeEdit,
    atomic_write,
    ensure_include,
    parse_conf,
    read_conf,
)
from tm4.asterisk.reload import AmiActionError, AmiError, reload_module, run_command
from tm4.asterisk.ties import (
    ENDPOINTS_FILE,
    EndpointCandidate,
    dangling_ties,
    endpoint_acl_name,
    endpoint_candidates,
    endpoints_path,
    prune_ties,
    render_endpoint_ties,
    tied_endpoints,
)
from tm4.core.config import Config
from tm4.core.errors import ValidationError
from tm4.core.model import Entry, IPAddress, IPNetwork, format_time, normalise_address
from tm4.core.services import ALL, SIP_SERVICES
from tm4.ops.engine import Core

log = logging.getLogger("tm4.asterisk")

ACL_NAME = "tm4"
ACL_FILE = "acl_tm4.conf"
ACL_SERVICES = (*SIP_SERVICES, "iax")
PENDING_KEY = "acl_reload_pending"

Rule = tuple[str, IPNetwork]  # ("permit" | "deny", network)

_HEADER = """\
; tm4's whitelist as an Asterisk named ACL. Written by tm4 -- edits are overwritten.
; It holds every entry granting {services} or all.
; Asterisk applies the LAST matching rule: everyone is denied first, then the
; whitelist is permitted. Use it with `acl = {name}` (see `tm4 asterisk install`).
"""


# -- rendering ------------------------------------------------------------------

def acl_path(config: Config) -> Path:
    return Path(config.asterisk.config_dir) / ACL_FILE


def acl_entries(entries: Iterable[Entry], now: datetime) -> list[Entry]:
    """Active entries that grant a SIP or IAX service."""
    wanted = {*ACL_SERVICES, ALL}
    return [e for e in entries if not e.is_expired(now) and wanted & set(e.services)]


def acl_networks(entries: Iterable[Entry], now: datetime) -> list[IPNetwork]:
    """The permitted networks, merged (an office /24 swallows the /32s inside it)."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for e in acl_entries(entries, now):
        for n in e.networks():
            (v4 if isinstance(n, ipaddress.IPv4Network) else v6).append(n)  # type: ignore[arg-type]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def rule_text(net: IPNetwork) -> str:
    """Asterisk's spelling: IPv4 with a dotted mask (as `acl show` prints it), IPv6 with a prefix."""
    if net.version == 4:
        return f"{net.network_address}/{net.netmask}"
    return f"{net.network_address}/{net.prefixlen}"


def desired_rules(entries: Iterable[Entry], now: datetime) -> list[Rule]:
    deny: list[Rule] = [("deny", ipaddress.ip_network("0.0.0.0/0")), ("deny", ipaddress.ip_network("::/0"))]
    return deny + [("permit", n) for n in acl_networks(entries, now)]


def render_acl(entries: Iterable[Entry], now: datetime, name: str = ACL_NAME,
               tied: Iterable[str] = ()) -> str:
    """The whole file. No timestamps: the same whitelist renders the same bytes.

    After [tm4], one [tm4-<endpoint>] per endpoint an active entry serves, and per
    endpoint in `tied` (tied to its ACL in pjsip: rendered even when nobody serves it
    any more, then it denies everyone -- an ACL Asterisk cannot find would be a
    warning at every reload)."""
    every = list(entries)
    entries = acl_entries(every, now)
    out = [_HEADER.format(services=", ".join(ACL_SERVICES), name=name).rstrip("\n"), f"[{name}]"]
    out += _rule_lines(desired_rules(entries, now), entries)
    per_endpoint = endpoint_entries(every, now)
    for ep in sorted(set(per_endpoint) | set(tied)):
        serving = per_endpoint.get(ep, [])
        out += ["", f"; endpoint {ep}: " + (", ".join(sorted(e.name for e in serving)) or "no active entry serves it"),
                f"[{endpoint_acl_name(ep)}]"]
        out += _rule_lines(desired_rules(serving, now), serving)
    return "\n".join(out) + "\n"


def _rule_lines(rules: Sequence[Rule], entries: Sequence[Entry]) -> list[str]:
    out = []
    for sense, net in rules:
        line = f"{sense} = {rule_text(net)}"
        if sense == "permit":
            names = sorted({e.name for e in entries if any(_overlaps(n, net) for n in e.networks())})
            shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
            line += f" ; {shown}"
        out.append(line)
    return out


# -- one ACL per endpoint ------------------------------------------------------------


def endpoint_entries(entries: Iterable[Entry], now: datetime) -> dict[str, list[Entry]]:
    """Endpoint -> the active entries that serve it (those granting SIP, IAX or all, as
    for [tm4]: an entry that cannot reach Asterisk has no business in its ACLs)."""
    out: dict[str, list[Entry]] = {}
    for e in acl_entries(entries, now):
        for ep in e.endpoints:
            out.setdefault(ep, []).append(e)
    return out


def endpoint_rules(entries: Iterable[Entry], now: datetime, tied: Iterable[str] = ()) -> dict[str, list[Rule]]:
    per = endpoint_entries(list(entries), now)
    return {ep: desired_rules(per.get(ep, []), now) for ep in sorted(set(per) | set(tied))}


def _overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.overlaps(b)  # type: ignore[arg-type]


# -- reading ACLs back ------------------------------------------------------------

def parse_rule(value: str) -> IPNetwork:
    """`addr`, `addr/bits`, `addr/dotted-mask` or (as `acl show` prints IPv6) `addr/ipv6-mask`."""
    addr, _, mask = value.strip().partition("/")
    ip = ipaddress.ip_address(addr)
    if not mask:
        return ipaddress.ip_network(ip)
    if mask.isdigit():
        return ipaddress.ip_network(f"{ip}/{mask}", strict=False)
    m = int(ipaddress.ip_address(mask))
    bits = ip.max_prefixlen
    prefix = bin(m).count("1")
    if m != ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1):
        raise ValueError(f"non-contiguous mask {mask!r}")
    return ipaddress.ip_network(f"{ip}/{prefix}", strict=False)


def rules_in_conf(text: str, name: str = ACL_NAME) -> list[Rule]:
    """The deny/permit rules of category [name] in an acl.conf-style text, in order."""
    conf = parse_conf(text, "ACL file")
    out: list[Rule] = []
    for key, value in conf.settings.get(name, []):
        if key in ("permit", "deny"):
            out.append((key, parse_rule(value)))
    return out


_SHOW_RE = re.compile(r"\s*\d+:\s+(allow|deny) - (\S+)\s*")


def parse_acl_show(lines: Sequence[str]) -> list[Rule] | None:
    """Rules from `acl show NAME` output; None when Asterisk does not know the ACL."""
    if any("Could not find ACL named" in ln for ln in lines):
        return None
    out: list[Rule] = []
    for ln in lines:
        m = _SHOW_RE.fullmatch(ln)
        if m:
            out.append(("permit" if m.group(1) == "allow" else "deny", parse_rule(m.group(2))))
    return out


def permits(rules: Sequence[Rule], address: IPAddress | str) -> bool:
    """What Asterisk's ast_apply_ha decides: start with allow, the last matching rule
    wins; IPv4 rules apply to IPv4 (and IPv4-mapped) sources only, IPv6 rules to IPv6."""
    addr = ipaddress.ip_address(address) if isinstance(address, str) else address
    addr = normalise_address(addr)
    verdict = True
    for sense, net in rules:
        if net.version == addr.version and addr in net:
            verdict = sense == "permit"
    return verdict


# -- keeping the file and Asterisk in step ------------------------------------

@dataclass
class AclSync:
    installed: bool
    changed: bool = False
    reloaded: bool = False
    pending: bool = False
    error: str = ""
    untied: list[str] = field(default_factory=list)  # endpoints pjsip.conf no longer defines before the include

    def to_json(self) -> dict[str, Any]:
        return {"installed": self.installed, "changed": self.changed, "reloaded": self.reloaded,
                "pending": self.pending, "error": self.error or None, "untied": self.untied}


def write_acl(core: Core) -> bool:
    """Rewrite acl_tm4.conf if its content differs; True if it changed. The reload is
    marked pending in the store at the same time."""
    path = acl_path(core.config)
    text = render_acl(core.entries(), core.clock(), tied=tied_endpoints(core.config))
    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = None
    if current == text:
        return False
    like = path.parent / "acl.conf"
    atomic_write(path, text, like=like if like.exists() else None, mode=0o640,
                 owner=_owner(path.parent))
    core.store.set_meta(PENDING_KEY, format_time(core.clock()))
    log.info("wrote %s", path)
    return True


def reload_pending(core: Core) -> bool:
    return core.store.get_meta(PENDING_KEY) is not None


async def flush_pending(core: Core, *, timeout: float = 5.0) -> AclSync:
    """Ask Asterisk to reload the ACL if a reload is pending (AMI came back)."""
    res = AclSync(installed=acl_path(core.config).exists())
    if not reload_pending(core):
        return res
    try:
        await reload_module(core.config.ami, "acl", timeout=timeout)
    except AmiError as exc:
        res.pending = True
        res.error = str(exc)
        log.warning("Asterisk ACL reload pending: %s", exc)
        return res
    core.store.set_meta(PENDING_KEY, None)
    res.reloaded = True
    return res


async def sync_acl_async(core: Core, *, timeout: float = 5.0) -> AclSync:
    """Write the ACL if the whitelist changed it, then reload it in Asterisk. Does
    nothing until `tm4 asterisk install` created the file."""
    untied = prune_ties(core)  # even without acl_tm4.conf: the include may still be read by pjsip
    if not acl_path(core.config).exists():
        return AclSync(installed=False, untied=untied)
    changed = write_acl(core)
    res = await flush_pending(core, timeout=timeout)
    res.changed = changed
    res.untied = untied
    return res


def sync_acl(core: Core) -> bool:
    """Sync wrapper for code outside an event loop; True if the file changed."""
    return asyncio.run(sync_acl_async(core)).changed


# -- status -------------------------------------------------------------------

@dataclass
class AclStatus:
    path: str
    exists: bool
    current: bool
    include: bool | None  # None: acl.conf missing or unreadable
    include_error: str = ""
    pending: bool = False
    ami: str = ""  # "ok", or why not
    asterisk_rules: list[str] | None = None  # what `acl show tm4` reports, if allowed
    asterisk_current: bool | None = None
    asterisk_note: str = ""
    rendered_rules: list[str] = field(default_factory=list)
    # per endpoint ACL: {endpoint, acl, tied, rendered_rules, asterisk_rules, asterisk_current}
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    # endpoints pjsip_tm4_endpoints.conf adds to that pjsip.conf does not define before it
    dangling: list[str] = field(default_factory=list)

    @property
    def dangling_warning(self) -> str:
        if not self.dangling:
            return ""
        return (f"{ENDPOINTS_FILE} adds to endpoint(s) {', '.join(self.dangling)} that pjsip.conf does not "
                "define before its #include: Asterisk ignores those sections, so the endpoint runs without its ACL "
                "(tm4d unties them within 30 s; `tm4 asterisk sync` now)")

    @property
    def ok(self) -> bool:
        return (self.exists and self.current and bool(self.include) and not self.pending and not self.dangling
                and self.asterisk_current is not False
                and all(e["asterisk_current"] is not False for e in self.endpoints if e["tied"]))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "exists": self.exists, "current": self.current,
            "include": self.include, "include_error": self.include_error or None,
            "reload_pending": self.pending, "ami": self.ami,
            "asterisk_rules": self.asterisk_rules, "asterisk_current": self.asterisk_current,
            "asterisk_note": self.asterisk_note or None, "rendered_rules": self.rendered_rules,
            "endpoints": self.endpoints, "dangling_ties": self.dangling,
            "dangling_warning": self.dangling_warning or None, "ok": self.ok,
        }


def _fmt(rules: Sequence[Rule]) -> list[str]:
    return [f"{sense} {rule_text(net)}" for sense, net in rules]


async def acl_status(core: Core, *, timeout: float = 5.0) -> AclStatus:
    cfg = core.config
    path = acl_path(cfg)
    entries = core.entries()
    now = core.clock()
    tied = tied_endpoints(cfg)
    text = render_acl(entries, now, tied=tied)
    want = desired_rules(entries, now)
    per_endpoint = endpoint_rules(entries, now, tied)
    try:
        current_text: str | None = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        current_text = None
    st = AclStatus(str(path), current_text is not None, current_text == text, None,
                   pending=reload_pending(core), rendered_rules=_fmt(want),
                   endpoints=[{"endpoint": ep, "acl": endpoint_acl_name(ep), "tied": ep in tied,
                               "rendered_rules": _fmt(rules), "asterisk_rules": None,
                               "asterisk_current": None} for ep, rules in per_endpoint.items()],
                   dangling=dangling_ties(cfg))
    main = path.parent / "acl.conf"
    if main.exists():
        try:
            _, conf = read_conf(main)
            st.include = conf.includes_file(ACL_FILE, path.parent)
        except ConfParseError as exc:
            st.include_error = str(exc)
    try:
        lines = await run_command(cfg.ami, f"acl show {ACL_NAME}", timeout=timeout)
    except AmiActionError as exc:
        st.ami = "ok"
        st.asterisk_note = (f"Asterisk's view is not available: {exc}"
                            + (" (the manager user needs write=command)"
                               if "Permission denied" in str(exc) else ""))
        return st
    except AmiError as exc:
        st.ami = str(exc)
        return st
    st.ami = "ok"
    got = parse_acl_show(lines)
    if got is None:
        st.asterisk_rules = []
        st.asterisk_current = False
        st.asterisk_note = f"Asterisk has no ACL named {ACL_NAME!r} (reload pending, or the include is missing)"
        return st
    st.asterisk_rules = _fmt(got)
    st.asterisk_current = got == want
    if not st.asterisk_current:
        st.asterisk_note = "Asterisk's loaded ACL differs from what tm4 rendered"
    for ep in st.endpoints:
        try:
            shown = parse_acl_show(await run_command(cfg.ami, f"acl show {ep['acl']}", timeout=timeout))
        except AmiError:
            continue
        ep["asterisk_rules"] = _fmt(shown) if shown is not None else []
        ep["asterisk_current"] = shown is not None and _fmt(shown) == ep["rendered_rules"]
    return st


def _owner(d: Path) -> tuple[int, int]:
    s = d.stat()
    return s.st_uid, s.st_gid


# -- tying endpoints to their ACL (tm4 asterisk install) ------------------------------


@dataclass
class EndpointTies:
    endpoints: list[str]
    file: Path
    changed: bool
    include: IncludeEdit | None = None
    reload: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"endpoints": self.endpoints, "file": str(self.file), "changed": self.changed,
                "include_added": bool(self.include and self.include.changed), "reload": self.reload or None}


def write_ties(core: Core, endpoints: Iterable[str]) -> EndpointTies:
    """Tie `endpoints` to their ACL: rewrite pjsip_tm4_endpoints.conf and #include it at
    the end of pjsip.conf. Refuses an endpoint that is not offered (ValidationError)."""
    cfg = core.config
    offered = {c.endpoint for c in endpoint_candidates(core) if c.offered}
    want = sorted(set(endpoints))
    refused = [ep for ep in want if ep not in offered]
    if refused:
        raise ValidationError(f"cannot tie {', '.join(refused)} to an endpoint ACL: only PJSIP phones that an "
                              "entry or passcode names (see `tm4 asterisk install`)")
    path = endpoints_path(cfg)
    text = render_endpoint_ties(want)
    try:
        before: str | None = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        before = None
    changed = before != text
    if changed:
        atomic_write(path, text, like=path.parent / "pjsip.conf", mode=0o640, owner=_owner(path.parent))
    inc = None
    if want or before is not None:
        inc = ensure_include(path.parent / "pjsip.conf", ENDPOINTS_FILE,
                             comment="tm4: endpoints that register only from their owners' addresses "
                                     "(tm4 asterisk install); keep this line LAST")
    if changed or (inc and inc.changed):
        write_acl(core)  # the [tm4-<endpoint>] sections must exist before pjsip references them
        core.store.set_meta(PENDING_KEY, format_time(core.clock()))
    return EndpointTies(want, path, changed, inc)


Chooser = Callable[[list[EndpointCandidate]], Sequence[str]]


@dataclass
class EndpointOffer:
    """What `tm4 asterisk install` offered per endpoint, and what it tied."""

    candidates: list[EndpointCandidate] = field(default_factory=list)
    ties: EndpointTies | None = None
    warning: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"candidates": [c.to_json() for c in self.candidates],
                "ties": self.ties.to_json() if self.ties else None, "warning": self.warning or None}

    def lines(self) -> list[str]:
        out = []
        for c in self.candidates:
            state = "tied (acl=" + endpoint_acl_name(c.endpoint) + ")" if c.endpoint in (
                self.ties.endpoints if self.ties else ([c.endpoint] if c.tied else [])) else (
                "not tied" if c.offered else f"not offered: {c.reason}")
            out.append(f"endpoint ACL:  {c.endpoint}: {state}")
        if self.ties is not None and self.ties.reload:
            out.append(f"pjsip:         {self.ties.reload}")
        if self.warning:
            out.append(f"warning:       {self.warning}")
        return out


async def offer_endpoint_acls(core: Core, choose: Chooser | None, *, timeout: float = 5.0) -> EndpointOffer:
    """Offer each candidate endpoint to `choose` (None: offer nothing, keep the ties as
    they are); tie the chosen ones, then reload res_pjsip so pjsip.conf's new include
    is read (the named ACLs themselves follow with `module reload acl`)."""
    offer = EndpointOffer()
    if not (Path(core.config.asterisk.config_dir) / "pjsip.conf").exists():
        return offer
    offer.candidates = endpoint_candidates(core)
    if choose is None:
        return offer
    chosen = list(choose([c for c in offer.candidates if c.offered]))
    ties = write_ties(core, chosen)
    offer.ties = ties
    if ties.changed or (ties.include and ties.include.changed):
        await flush_pending(core, timeout=timeout)  # [tm4-<endpoint>] loaded before pjsip refers to it
        try:
            await reload_module(core.config.ami, "res_pjsip.so", timeout=timeout)
            ties.reload = "reloaded (Module: res_pjsip.so)"
        except AmiError as exc:
            ties.reload = f"NOT reloaded ({exc}): run  asterisk -rx \"module reload res_pjsip.so\""
    return offer
