"""What `apply` would change: desired rule set versus the kernel, as a readable diff."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import datetime

from tm4.core.rules import Ruleset, interval_text
from tm4.firewall.nft import NftBackend


@dataclass
class Plan:
    table_present: bool
    rules_changed: bool
    add: dict[str, list[str]] = field(default_factory=dict)
    remove: dict[str, list[str]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.table_present and not self.rules_changed and not self.add and not self.remove

    def lines(self) -> list[str]:
        out: list[str] = []
        if not self.table_present:
            out.append("+ table inet tm4 (not loaded: apply creates it)")
        elif self.rules_changed:
            out.append("~ rules of table inet tm4 differ from the last apply (config change or drift)")
        for name in sorted(set(self.add) | set(self.remove)):
            out.extend(f"- {name} {t}" for t in self.remove.get(name, []))
            out.extend(f"+ {name} {t}" for t in self.add.get(name, []))
        return out or ["nothing to do: the kernel matches the store"]

    def to_json(self) -> dict[str, object]:
        return {"table_present": self.table_present, "rules_changed": self.rules_changed,
                "add": self.add, "remove": self.remove}


def _parse_elem(e: object) -> tuple[int, int] | None:
    if isinstance(e, dict) and "elem" in e:
        return _parse_elem(e["elem"].get("val"))
    if isinstance(e, str):
        a = int(ipaddress.ip_address(e))
        return a, a
    if isinstance(e, dict) and "prefix" in e:
        net = ipaddress.ip_network(f"{e['prefix']['addr']}/{e['prefix']['len']}")
        return int(net.network_address), int(net.broadcast_address)
    if isinstance(e, dict) and "range" in e:
        lo, hi = e["range"]
        return int(ipaddress.ip_address(lo)), int(ipaddress.ip_address(hi))
    return None


def kernel_intervals(backend: NftBackend, name: str) -> set[tuple[int, int]] | None:
    elems = backend.set_elements(name)
    if elems is None:
        return None
    return {iv for iv in (_parse_elem(e) for e in elems) if iv is not None}


def make_plan(rs: Ruleset, backend: NftBackend, applied_rules: str | None, rules_now: str,
              now: datetime) -> Plan:
    present = backend.present()
    plan = Plan(table_present=present, rules_changed=present and applied_rules != rules_now)
    for name, s in sorted(rs.sets.items()):
        if s.dynamic:
            continue
        want = {(e.lo, e.hi) for e in s.elements if e.expires is None or e.expires > now}
        if getattr(backend, "prefix_elements", False):  # ipset keeps a range as its prefixes
            from tm4.firewall.iptables import prefix_intervals

            bits = 32 if s.version == 4 else 128
            want = {p for lo, hi in want for p in prefix_intervals(lo, hi, bits)}
        got = kernel_intervals(backend, name) if present else set()
        if got is None:  # a set tm4 renders is missing from the kernel
            plan.rules_changed = True
        have = got or set()
        if want - have:
            plan.add[name] = [interval_text(s.version, lo, hi) for lo, hi in sorted(want - have)]
        if have - want:
            plan.remove[name] = [interval_text(s.version, lo, hi) for lo, hi in sorted(have - want)]
    return plan
