"""What the kernel holds of tm4's, read from what the tools print. Pure.

- `parse_save`: tm4's chains and INPUT's rules from `iptables-save -t filter`;
- `parse_ipset_list`: sets (type, header, members) from `ipset list [-t]`;
- `member_json`: one ipset member in the shape `nft -j` gives set elements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tm4.firewall.iptables_names import CHAIN_PREFIX


def targets_tm4(rule: str) -> bool:
    """Does this rule (arguments after `-A CHAIN`) send packets to a TM4-* chain?"""
    return re.search(rf"(^|\s)-[jg] {re.escape(CHAIN_PREFIX)}\S", rule) is not None


@dataclass
class LiveChains:
    """What one family's filter table holds of tm4's: its chains, and INPUT's rules."""

    chains: dict[str, list[str]] = field(default_factory=dict)  # TM4-* -> rule args (no -A NAME)
    input_rules: list[str] = field(default_factory=list)  # every INPUT rule, in order

    def jumps(self) -> list[int]:
        """1-based positions of INPUT rules sending packets to a TM4-* chain."""
        return [i + 1 for i, r in enumerate(self.input_rules) if targets_tm4(r)]

    def jump_rules(self) -> list[tuple[int, str]]:
        """Those INPUT rules as (position, rule) pairs."""
        return [(p, self.input_rules[p - 1]) for p in self.jumps()]


def parse_save(text: str) -> LiveChains:
    """tm4's part of `iptables-save -t filter`."""
    live = LiveChains()
    in_filter = False
    for line in text.splitlines():
        if line.startswith("*"):
            in_filter = line == "*filter"
            continue
        if not in_filter or line.startswith("#"):
            continue
        if line.startswith(":"):
            name = line[1:].split()[0]
            if name.startswith(CHAIN_PREFIX):
                live.chains.setdefault(name, [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            args = rest[0] if rest else ""
            if chain == "INPUT":
                live.input_rules.append(args)
            elif chain.startswith(CHAIN_PREFIX):
                live.chains.setdefault(chain, []).append(args)
    return live


_STABLE_HEADER = ("family", "maxelem", "timeout", "netmask")


@dataclass
class LiveSet:
    name: str
    kind: str
    header: dict[str, str]
    members: list[str] = field(default_factory=list)  # "ADDR[/LEN] [timeout N]"

    def signature(self) -> tuple[str, str]:
        return self.kind, self.header.get("family", "")

    def listing(self, members: bool) -> list[str]:
        """This set for `tm4 show`: its type and the header fields that do not change
        by themselves, then (`members`) its members, sorted."""
        head = " ".join(f"{k} {self.header[k]}" for k in _STABLE_HEADER if k in self.header)
        out = [f"set {self.name} {self.kind} {head}"]
        if members and self.members:
            ms = sorted(m.removesuffix(" timeout 0") for m in self.members)
            out.append("\telements = { " + ",\n\t\t".join(ms) + " }")
        return out


def parse_ipset_list(text: str) -> dict[str, LiveSet]:
    """`ipset list [-t]` output -> name -> LiveSet."""
    out: dict[str, LiveSet] = {}
    cur: LiveSet | None = None
    in_members = False
    for line in text.splitlines():
        if line.startswith("Name: "):
            cur = LiveSet(line[6:].strip(), "", {})
            out[cur.name] = cur
            in_members = False
        elif cur is None:
            continue
        elif line.startswith("Type: "):
            cur.kind = line[6:].strip()
        elif line.startswith("Header: "):
            words = line[8:].split()
            cur.header = dict(zip(words[::2], words[1::2], strict=False))
        elif line.startswith("Members:"):
            in_members = True
        elif in_members and line.strip():
            cur.members.append(line.strip())
        elif not line.strip():
            in_members = False
    return out


def member_json(member: str) -> object:
    """One ipset member in the shape `nft -j` gives set elements."""
    words = member.split()
    addr = words[0]
    val: object = addr
    if "/" in addr:
        a, plen = addr.split("/", 1)
        val = {"prefix": {"addr": a, "len": int(plen)}}
    if "timeout" in words:
        left = int(words[words.index("timeout") + 1])
        if left > 0:
            return {"elem": {"val": val, "expires": left}}
    return val
