"""Other firewalls on the same host: Docker, firewalld, ufw, a hand-written nftables.conf.

They keep their own tables; tm4 keeps `inet tm4`. A packet must pass the input
hook of EVERY table, so a drop elsewhere still drops what tm4 accepts, and
`systemctl restart nftables` (`flush ruleset`) wipes tm4's table too — the drift
check puts it back. This module only looks and reports.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tm4.core.errors import ApplyError


class _Runner(Protocol):
    def run(self, script: str, json_out: bool = False) -> str: ...


@dataclass(frozen=True)
class Neighbour:
    kind: str  # docker, firewalld, ufw, iptables-nft, iptables-legacy, nftables
    where: str  # "inet firewalld", "ip filter", ...
    input_hook: bool  # has a base chain on the input hook (can drop what tm4 accepts)
    note: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "where": self.where, "input_hook": self.input_hook, "note": self.note}


NOTES = {
    "docker": "Docker's tables: published container ports go through FORWARD, not tm4's input chain",
    "firewalld": "firewalld is active: both must accept a packet; `systemctl reload firewalld` leaves tm4 alone",
    "ufw": "ufw is active: both must accept a packet",
    "iptables-nft": "iptables rules (nft backend): both must accept a packet",
    "iptables-legacy": "legacy iptables rules: invisible to nft, both must accept a packet",
    "nftables": "another nftables table with an input hook: both must accept a packet",
}


def classify(chains: list[dict[str, Any]], tables_seen: Sequence[tuple[str, str]] = ()) -> list[Neighbour]:
    """Neighbours from `nft -j list chains` objects and (family, name) of every table (pure)."""
    tables: dict[tuple[str, str], list[dict[str, Any]]] = {t: [] for t in tables_seen}
    for c in chains:
        tables.setdefault((c.get("family", ""), c.get("table", "")), []).append(c)
    out: list[Neighbour] = []
    for (family, table), cs in sorted(tables.items()):
        if (family, table) == ("inet", "tm4"):
            continue
        names = {c.get("name", "") for c in cs}
        hook = any(c.get("hook") == "input" for c in cs)
        if table == "firewalld":
            kind = "firewalld"
        elif any(n.startswith(("ufw-", "ufw6-")) for n in names):
            kind = "ufw"
        elif any(n.startswith("DOCKER") for n in names) or table.startswith("docker"):
            kind = "docker"
        elif names & {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"}:
            kind = "iptables-nft"
        else:
            kind = "nftables"
        out.append(Neighbour(kind, f"{family} {table}", hook, NOTES[kind]))
    return out


def legacy_iptables(proc: Path = Path("/proc")) -> list[Neighbour]:
    out = []
    for name, fam in (("ip_tables_names", "ip"), ("ip6_tables_names", "ip6")):
        try:
            tables = (proc / "net" / name).read_text().split()
        except OSError:
            continue
        if tables:
            out.append(Neighbour("iptables-legacy", f"{fam} {','.join(tables)}", "filter" in tables,
                                 NOTES["iptables-legacy"]))
    return out


def detect(runner: _Runner, proc: Path = Path("/proc")) -> list[Neighbour]:
    """What else filters packets here. Never raises: an unreadable ruleset gives []."""
    try:
        data = json.loads(runner.run("list chains", json_out=True) or "{}")
        tdata = json.loads(runner.run("list tables", json_out=True) or "{}")
    except (ApplyError, ValueError):
        data, tdata = {}, {}
    chains = [o["chain"] for o in data.get("nftables", []) if "chain" in o]
    tables = [(o["table"]["family"], o["table"]["name"]) for o in tdata.get("nftables", []) if "table" in o]
    return classify(chains, tables) + legacy_iptables(proc)


def summary(neighbours: list[Neighbour]) -> str:
    if not neighbours:
        return "none (tm4 is the only firewall)"
    return "; ".join(f"{n.kind} ({n.where}{', input hook' if n.input_hook else ''})" for n in neighbours)
