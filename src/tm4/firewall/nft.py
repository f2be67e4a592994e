"""nftables backend: tm4 owns table `inet tm4`, replaced in one `nft -f` transaction."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from tm4.core.errors import ApplyError
from tm4.core.rules import Element, NftSet, Ruleset, SetChanges, interval_text
from tm4.firewall.runner import NftRunner

TABLE = "tm4"
FAMILY = "inet"


def _timeout(e: Element, now: datetime) -> str:
    if e.expires is None:
        return ""
    secs = max(1, math.ceil((e.expires - now).total_seconds()))
    return f" timeout {secs}s"


def render_elements(s_version: int, elements: Iterable[Element], now: datetime) -> list[str]:
    out: list[str] = []
    timeouts: dict[datetime, str] = {}  # many elements share an expiry (one bulk load, one TTL)
    for e in elements:
        exp = e.expires
        if exp is None:
            out.append(interval_text(s_version, e.lo, e.hi))
        elif exp > now:
            t = timeouts.get(exp)
            if t is None:
                t = timeouts[exp] = f" timeout {max(1, math.ceil((exp - now).total_seconds()))}s"
            out.append(interval_text(s_version, e.lo, e.hi) + t)
    return out


def render_set(s: NftSet, now: datetime, carried: Iterable[str] = ()) -> str:
    lines = [f"\tset {s.name} {{", f"\t\ttype {s.addr_type}"]
    if s.flags:
        lines.append(f"\t\tflags {','.join(s.flags)}")
    if s.timeout:
        lines.append(f"\t\ttimeout {s.timeout}")
    if s.size:
        lines.append(f"\t\tsize {s.size}")
    elems = render_elements(s.version, s.elements, now) + list(carried)
    if elems:
        lines.append("\t\telements = { " + ",\n\t\t\t".join(elems) + " }")
    lines.append("\t}")
    return "\n".join(lines)


def render_script(rs: Ruleset, now: datetime, carried: Mapping[str, list[str]] | None = None) -> str:
    """One transaction: create-if-missing, delete, recreate. The kernel applies all or nothing."""
    carried = carried or {}
    out = [f"table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}", f"table {FAMILY} {TABLE} {{"]
    for name in sorted(rs.sets):
        out.append(render_set(rs.sets[name], now, carried.get(name, ())))
    for cname in sorted(rs.chains):
        out.append(f"\tchain {cname} {{")
        out.extend(f"\t\t{r}" for r in rs.chains[cname])
        out.append("\t}")
    out.append("\tchain input {")
    out.append("\t\ttype filter hook input priority filter; policy drop;")
    out.extend(f"\t\t{r}" for r in rs.input_rules)
    out.append("\t}")
    out.append("}")
    return "\n".join(out) + "\n"


def render_changes(ch: SetChanges, now: datetime) -> str:
    """Element changes as one batch: deletes first, so a piece can be re-cut in place.
    (If the kernel timed an element out meanwhile the batch fails whole; the core
    then falls back to a full apply.)"""
    out: list[str] = []
    for name, elems in ch.delete.items():
        texts = [e.text(ch.versions[name]) for e in elems]
        if texts:
            out.append(f"delete element {FAMILY} {TABLE} {name} {{ {', '.join(texts)} }}")
    for name, elems in ch.add.items():
        texts = render_elements(ch.versions[name], elems, now)
        if texts:
            out.append(f"add element {FAMILY} {TABLE} {name} {{ {', '.join(texts)} }}")
    return "\n".join(out) + ("\n" if out else "")


class NftBackend:
    def __init__(self, netns: str = "", runner: NftRunner | None = None):
        self.runner = runner or NftRunner(netns)

    def apply(self, ruleset: Ruleset, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        carried = self._live_dynamic(ruleset)
        self.runner.run(render_script(ruleset, now, carried))

    def apply_changes(self, changes: SetChanges, now: datetime | None = None) -> None:
        script = render_changes(changes, now or datetime.now(UTC))
        if script.strip():
            self.runner.run(script)

    def present(self) -> bool:
        try:
            self.runner.run(f"list table {FAMILY} {TABLE}")
        except ApplyError:
            return False
        return True

    def listing(self, terse: bool = False) -> str | None:
        """`nft list table inet tm4`; terse: without set contents and counters (the rules'
        shape, cheap even with 100,000 bans). None when the table is absent."""
        try:
            return self.runner.run(f"list table {FAMILY} {TABLE}", terse=terse)
        except ApplyError:
            return None

    def remove(self) -> None:
        self.runner.run(f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")

    def set_elements(self, name: str) -> list[dict[str, object]] | None:
        """The kernel's elements of one set (JSON objects), or None if the set is missing."""
        try:
            out = self.runner.run(f"list set {FAMILY} {TABLE} {name}", json_out=True)
        except ApplyError:
            return None
        for obj in json.loads(out or "{}").get("nftables", []):
            if "set" in obj:
                return list(obj["set"].get("elem", []))
        return []

    def _live_dynamic(self, ruleset: Ruleset) -> dict[str, list[str]]:
        """Elements the kernel put in dynamic sets (knock stages, meters), to carry over."""
        carried: dict[str, list[str]] = {}
        for name, s in ruleset.sets.items():
            if not s.dynamic:
                continue
            elems = self.set_elements(name) or []
            carried[name] = [t for t in (_elem_text(e) for e in elems) if t]
        return carried


def _elem_text(e: object) -> str | None:
    """One JSON set element back as nft text, keeping its remaining lifetime."""
    if isinstance(e, str):
        return e
    if isinstance(e, dict) and "elem" in e:
        inner = e["elem"]
        val = _elem_text(inner.get("val"))
        if val is None:
            return None
        expires = inner.get("expires")
        return f"{val} timeout {max(1, int(expires))}s" if expires else val
    if isinstance(e, dict) and "prefix" in e:
        return f"{e['prefix']['addr']}/{e['prefix']['len']}"
    if isinstance(e, dict) and "range" in e:
        lo, hi = e["range"]
        return f"{lo}-{hi}"
    return None
