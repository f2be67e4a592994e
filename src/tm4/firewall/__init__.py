"""Firewall backends: turn a Ruleset into kernel state, atomically (nftables; iptables +
ipset), the plan (desired versus kernel), the netns helper and the other firewalls on the host.

May import: tm4.core.
"""

from __future__ import annotations

from typing import Protocol

from tm4.core.rules import Ruleset, SetChanges


class Backend(Protocol):
    def apply(self, ruleset: Ruleset) -> None:
        """Replace tm4's table with `ruleset` in one transaction (old table kept on failure)."""

    def apply_changes(self, changes: SetChanges) -> None:
        """Add/delete set elements in one transaction."""

    def present(self) -> bool:
        """Is tm4's table loaded?"""

    def listing(self) -> str | None:
        """The kernel's own listing of tm4's table, or None when absent."""

    def remove(self) -> None:
        """Drop tm4's table (the deliberate 'open up')."""


def make_backend(kind: str, netns: str = "") -> Backend:
    if kind == "iptables":
        from tm4.firewall.iptables import IptablesBackend

        return IptablesBackend(netns=netns)
    from tm4.firewall.nft import NftBackend

    return NftBackend(netns=netns)
