"""tm4's nft Ruleset as one family's iptables chains. Pure.

`translate(ruleset, family)` gives iptables chain name -> rule argument strings
(what follows `-A CHAIN`): each nft rule, parsed by iptables_rule_parser, is
expanded into as many iptables rules as the product of its parts needs.

Responsive mode translates faithfully: a `meter` with `limit rate` becomes a
`hashlimit` match (same rate, burst, idle expiry, size), one with `ct count` a
`connlimit` match (the same conntrack count), IPv6 keyed by the same prefix;
`add @clamp { KEY }` becomes `-j SET --add-set` into a `hash:ip` set with the
clamp's default timeout (and `netmask` for a masked IPv6 key), and a rule with
side effects and a verdict goes through a helper chain (`TM4-INPUT-N`). A rule
that updates sets and then returns (port-knock stages), or anything else the
translator does not know, raises TranslateError (an ApplyError) naming the nft
backend, before anything is touched.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from tm4.core.rules import Ruleset
from tm4.firewall.iptables_names import chain_name
from tm4.firewall.iptables_rule_parser import parse_rule, untranslatable


@dataclass
class Translation:
    """One family's chains (iptables name -> rule argument strings) and set needs."""

    chains: dict[str, list[str]]
    masks: dict[str, int]


def translate(rs: Ruleset, family: int) -> Translation:
    """The whole rule set for one family; raises TranslateError for what iptables cannot do."""
    chains: dict[str, list[str]] = {}
    masks: dict[str, int] = {}
    nft_chains = list(rs.chains)
    for nft_chain, rules in [("input", rs.input_rules), *sorted(rs.chains.items())]:
        name = chain_name(nft_chain)
        out = chains.setdefault(name, [])
        helpers = 0
        for text in rules:
            r = parse_rule(text, rs.sets, nft_chains, nft_chain)
            for s, m in r.masks.items():
                if masks.setdefault(s, m) != m:
                    raise untranslatable(text, nft_chain, f"set {s} is keyed by two different masks")
            if family not in r.families:
                continue
            target = r.verdict
            if r.actions and not r.verdict and len(r.actions) == 1:
                target = r.actions[0]
            elif r.actions:
                if r.verdict.startswith("-g") or r.verdict == "-j RETURN":
                    raise untranslatable(text, nft_chain, "it updates sets and then leaves the chain; "
                                         "iptables can only do that through a helper chain, which "
                                         "changes where it returns to")
                helpers += 1
                helper = f"{name}-{helpers}"
                chains[helper] = [*r.actions, *([r.verdict] if r.verdict else [])]
                target = f"-j {helper}"
            head = [f"-p {r.proto}"] if r.proto else []
            for combo in itertools.product(*r.parts):
                out.append(" ".join([*head, *_merge_ports(list(combo)), *([target] if target else [])]))
    return Translation(chains, masks)


def _merge_ports(parts: list[str]) -> list[str]:
    """`-m udp --sport 67` + `-m udp --dport 68` -> `-m udp --sport 67 --dport 68`."""
    out: list[str] = []
    for p in parts:
        m = re.match(r"-m (tcp|udp) (--[sd]port \S+)$", p)
        if m and out and re.match(rf"-m {m.group(1)} --[sd]port \S+$", out[-1]) \
                and m.group(2).split()[0] not in out[-1]:
            out[-1] = f"{out[-1]} {m.group(2)}"
        else:
            out.append(p)
    return out
