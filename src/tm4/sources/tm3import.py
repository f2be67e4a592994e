"""Migration from Travelin' Man 3: account files and the iptables rules file they went into.

What is read from DIR:
- account files `NAME.iptables`: `-A INPUT -s SOURCE ... -j ACCEPT` lines, one
  account per file (the name comes from the file), `#` marker lines kept as the
  entry's note;
- the rules file the accounts were inserted into (iptables-save format:
  `iptables`, `rules.v4`, `rules.v6`, `iptables.rules` in DIR, or `--rules FILE`):
  ACCEPT rules with a source that no account file already covers become entries
  named after their `--comment`, else `tm3-SOURCE`.

Ports map to catalogue services only when a service fits inside them exactly
(udp 5060 -> sip-udp; a bare `-j ACCEPT` -> all); nothing is ever widened.
What cannot be mapped (other ports, negations, interfaces, blocks, rules open
to everyone, unreadable lines) is reported with its file and line. RTP ports
need no entry: tm4 opens firewall.rtp to everyone.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tm4.core.errors import Tm4Error, ValidationError
from tm4.core.model import Origin, Source
from tm4.core.services import ALL, Service, parse_ports

if TYPE_CHECKING:
    from tm4.ops.engine import Core

RULES_FILES = ("iptables", "rules.v4", "rules.v6", "iptables.rules")
_KNOCK_NAME = re.compile(r"(?:knock-)?(\d{8})-?(\d{6})")


@dataclass
class Rule:
    sources: list[str]
    proto: str  # "" (any), tcp, udp
    ports: list[tuple[int, int]]  # empty: every port
    target: str
    comment: str
    where: str
    iface: str = ""
    state: bool = False  # an ESTABLISHED/RELATED rule


@dataclass
class Problem:
    where: str
    text: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"where": self.where, "line": self.text, "reason": self.reason}


@dataclass
class Proposal:
    name: str
    sources: list[str]
    services: list[str]
    origin: Origin
    note: str
    where: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sources": self.sources, "services": self.services,
                "origin": str(self.origin), "note": self.note, "from": self.where}


@dataclass
class Tm3Import:
    entries: list[Proposal] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # could not map: the admin must look
    skipped: list[Problem] = field(default_factory=list)  # needs nothing in tm4 (RTP, loopback, ...)
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "entries": [e.to_json() for e in self.entries],
            "unmapped": [p.to_json() for p in self.problems],
            "skipped": [p.to_json() for p in self.skipped],
        }


class _LineError(Exception):
    pass


def parse_rule(line: str, where: str) -> Rule | None:
    """One iptables-save / `iptables ...` line; None for lines that are not rules."""
    text = line.strip()
    if not text or text.startswith(("#", "*", ":", "COMMIT")):
        return None
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise _LineError(f"unreadable ({exc})") from None
    if argv and argv[0].rsplit("/", 1)[-1] in ("iptables", "ip6tables"):
        argv = argv[1:]
    if len(argv) < 2 or argv[0] not in ("-A", "-I", "--append", "--insert"):
        raise _LineError("not an -A/-I rule")
    chain, args = argv[1], argv[2:]
    if args and args[0].isdigit():  # -I INPUT 3 ...
        args = args[1:]
    if chain != "INPUT":
        raise _LineError(f"chain {chain}: tm4 only imports INPUT rules")
    rule = Rule([], "", [], "", "", where)
    i = 0
    negate = False

    def value() -> str:
        nonlocal i
        if i + 1 >= len(args):
            raise _LineError(f"{args[i]} without a value")
        i += 1
        return args[i]

    while i < len(args):
        a = args[i]
        if a == "!":
            negate = True
            i += 1
            continue
        if a in ("-s", "--source", "--src"):
            if negate:
                raise _LineError("a negated source (! -s) cannot be a whitelist entry")
            rule.sources.extend(s for s in value().split(",") if s)
        elif a in ("-p", "--protocol"):
            p = value().lower()
            if negate or p not in ("tcp", "udp", "all", "0"):
                raise _LineError(f"protocol {'! ' if negate else ''}{p} has no tm4 service")
            rule.proto = "" if p in ("all", "0") else p
        elif a in ("-m", "--match"):
            value()
        elif a in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            if negate:
                raise _LineError("negated ports cannot be mapped")
            try:
                rule.ports.extend(parse_ports(value().replace(":", "-"), "ports"))
            except ValidationError as exc:
                raise _LineError(str(exc)) from None
        elif a in ("-i", "--in-interface"):
            rule.iface = value()
        elif a in ("--state", "--ctstate"):
            states = value().upper().split(",")
            rule.state = bool(states) and set(states) <= {"ESTABLISHED", "RELATED"}
            if not rule.state:
                raise _LineError(f"state {','.join(states)} cannot be mapped")
        elif a == "--comment":
            rule.comment = value()
        elif a in ("-j", "--jump"):
            if rule.target:
                raise _LineError("two -j targets")
            rule.target = value().upper()
        elif a in ("-d", "--destination", "--dst", "--sport", "--source-port", "--sports", "-o",
                   "--out-interface", "--icmp-type", "--limit", "--limit-burst", "--syn",
                   "--tcp-flags", "--mac-source", "--set", "--update", "--rcheck", "--seconds",
                   "--hitcount", "--name"):
            raise _LineError(f"{a} has no tm4 equivalent")
        else:
            raise _LineError(f"unknown option {a}")
        negate = False
        i += 1
    if not rule.target:
        raise _LineError("no -j target")
    if rule.ports and not rule.proto:
        raise _LineError("ports without -p tcp/udp")
    return rule


def map_services(rule: Rule, catalogue: Mapping[str, Service], rtp: tuple[int, int] | None
                 ) -> tuple[list[str], str, bool]:
    """(services, what is left unmapped, whether RTP ports were dropped) for one ACCEPT rule."""
    if not rule.proto:
        return [ALL], "", False
    if not rule.ports:
        return [], f"every {rule.proto} port: no service is that wide", False
    wanted: set[int] = set()
    for lo, hi in rule.ports:
        wanted.update(range(lo, hi + 1))
    names: list[str] = []
    covered: set[int] = set()
    for name, svc in sorted(catalogue.items()):
        if svc.is_all or svc.proto != rule.proto:
            continue
        ports = {p for lo, hi in svc.ports for p in range(lo, hi + 1)}
        if ports <= wanted:
            names.append(name)
            covered |= ports
    rest = wanted - covered
    rtp_dropped = False
    if rtp and rule.proto == "udp":
        in_rtp = {p for p in rest if rtp[0] <= p <= rtp[1]}
        rtp_dropped = bool(in_rtp)
        rest -= in_rtp
    return names, (f"{rule.proto} port(s) {_ranges(rest)} match no tm4 service" if rest else ""), rtp_dropped


def _ranges(ports: set[int]) -> str:
    out: list[list[int]] = []
    for p in sorted(ports):
        if out and out[-1][1] == p - 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def _source_text(sources: list[str]) -> str:
    if not sources:
        return "x"
    try:
        return Source.parse(sources[0]).text.replace("/", "-")
    except Tm4Error:
        return sources[0]


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return s[:60].rstrip("-._") or "account"


def _read_lines(path: Path, imp: Tm3Import) -> list[str] | None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        imp.problems.append(Problem(path.name, "", f"cannot read: {exc.strerror}"))
        return None
    if b"\x00" in data:
        imp.problems.append(Problem(path.name, "", "binary file, not iptables rules"))
        return None
    return data.decode("utf-8", errors="replace").splitlines()


class _Builder:
    """Rules -> proposals: per name, sources grouped by identical services (never widened)."""

    def __init__(self, imp: Tm3Import, catalogue: Mapping[str, Service], rtp: tuple[int, int] | None):
        self.imp = imp
        self.catalogue = catalogue
        self.rtp = rtp
        self.grants: dict[str, dict[str, set[str]]] = {}  # name -> source -> services
        self.where: dict[str, list[str]] = {}
        self.notes: dict[str, str] = {}
        self.seen: dict[tuple[str, str, str], str] = {}  # (source, proto, ports) -> account

    def rule(self, r: Rule, name: str, text: str, from_rules_file: bool) -> None:
        imp = self.imp
        if r.target != "ACCEPT":
            what = "a block: use `tm4 block` for it" if r.target in ("DROP", "REJECT") else f"target {r.target}"
            imp.problems.append(Problem(r.where, text, f"{what}; not imported"))
            return
        if not r.sources:
            if r.iface == "lo" or r.state:
                imp.skipped.append(Problem(r.where, text, "tm4 does this itself"))
            elif r.proto == "udp" and self.rtp and r.ports and all(
                    self.rtp[0] <= lo and hi <= self.rtp[1] for lo, hi in r.ports):
                imp.skipped.append(Problem(r.where, text, "RTP: tm4 opens firewall.rtp to everyone"))
            else:
                imp.problems.append(Problem(
                    r.where, text, "open to everyone; if you mean it, add the service to "
                                   "firewall.public_services"))
            return
        if r.iface and r.iface != "lo":
            imp.problems.append(Problem(r.where, text, f"interface {r.iface}: tm4 entries are not per interface"))
            return
        services, rest, rtp_dropped = map_services(r, self.catalogue, self.rtp)
        if rest:
            imp.problems.append(Problem(r.where, text, rest))
        if rtp_dropped and not services:
            imp.skipped.append(Problem(r.where, text, "RTP: tm4 opens firewall.rtp to everyone"))
        if not services:
            return
        key_ports = ",".join(f"{a}-{b}" for a, b in r.ports)
        for raw in r.sources:
            try:
                src = Source.parse(raw).text
            except Tm4Error as exc:
                imp.problems.append(Problem(r.where, text, str(exc)))
                continue
            key = (src, r.proto, key_ports)
            if from_rules_file and key in self.seen:
                imp.skipped.append(Problem(r.where, text, f"already imported from account {self.seen[key]}"))
                continue
            self.seen.setdefault(key, name)
            self.grants.setdefault(name, {}).setdefault(src, set()).update(services)
            self.where.setdefault(name, []).append(r.where)

    def proposals(self) -> list[Proposal]:
        out: list[Proposal] = []
        for name, by_source in self.grants.items():
            groups: dict[tuple[str, ...], list[str]] = {}
            for src, svcs in by_source.items():
                key = (ALL,) if ALL in svcs else tuple(sorted(svcs))
                groups.setdefault(key, []).append(src)
            origin = Origin.ADMIN
            m = _KNOCK_NAME.fullmatch(name)
            base = name
            if m:
                origin, base = Origin.KNOCK, f"knock-{m.group(1)}-{m.group(2)}"
            for i, (svcs, srcs) in enumerate(sorted(groups.items())):
                out.append(Proposal(
                    base if i == 0 else f"{base}-{i + 1}"[:63], srcs, list(svcs), origin,
                    self.notes.get(name, "imported from Travelin' Man 3"), sorted(set(self.where[name])),
                ))
        return sorted(out, key=lambda p: p.name)


def read_tm3(directory: str | Path, catalogue: Mapping[str, Service], rtp: tuple[int, int] | None,
             rules_file: str | Path | None = None) -> Tm3Import:
    d = Path(directory)
    if not d.is_dir():
        raise ValidationError(f"{d} is not a directory")
    imp = Tm3Import()
    b = _Builder(imp, catalogue, rtp)
    for path in sorted(d.glob("*.iptables")):
        imp.files.append(path.name)
        name = _slug(path.stem)
        lines = _read_lines(path, imp)
        if lines is None:
            continue
        markers: list[str] = []
        rules = 0
        for n, line in enumerate(lines, 1):
            where = f"{path.name}:{n}"
            s = line.strip()
            if s.startswith("#"):
                if s.strip("# ").strip():
                    markers.append(s.lstrip("#").strip())
                continue
            try:
                r = parse_rule(line, where)
            except _LineError as exc:
                imp.problems.append(Problem(where, s[:200], str(exc)))
                continue
            if r is None:
                continue
            rules += 1
            b.rule(r, name, s[:200], from_rules_file=False)
        if not rules:
            imp.problems.append(Problem(path.name, "", "no -A INPUT rule in this account file"))
        b.notes[name] = ("tm3: " + "; ".join(markers))[:500] if markers else f"imported from {path.name}"
    candidates = [Path(rules_file)] if rules_file else [d / f for f in RULES_FILES if (d / f).is_file()]
    for path in candidates:
        imp.files.append(path.name)
        lines = _read_lines(path, imp)
        if lines is None:
            continue
        for n, line in enumerate(lines, 1):
            where = f"{path.name}:{n}"
            try:
                r = parse_rule(line, where)
            except _LineError as exc:
                imp.problems.append(Problem(where, line.strip()[:200], str(exc)))
                continue
            if r is None:
                continue
            name = _slug(r.comment) if r.comment else _slug("tm3-" + _source_text(r.sources))
            b.notes.setdefault(name, f"imported from {path.name}")
            b.rule(r, name, line.strip()[:200], from_rules_file=True)
    if not imp.files:
        imp.problems.append(Problem(str(d), "", "no *.iptables account files and no rules file here"))
    imp.entries = b.proposals()
    return imp


def apply_import(core: Core, imp: Tm3Import, *, replace: bool = False, actor: str = "") -> list[tuple[str, str]]:
    """Store the proposals; returns (name, what happened) for each."""
    out: list[tuple[str, str]] = []
    for p in imp.entries:
        if core.store.get_entry(p.name) is not None and not replace:
            out.append((p.name, "exists; left alone (use --replace)"))
            continue
        try:
            core.allow(p.name, p.sources, p.services, origin=p.origin, note=p.note, actor=actor,
                       replace=replace)
        except Tm4Error as exc:
            out.append((p.name, f"refused: {exc}"))
            continue
        out.append((p.name, "imported"))
    return out
