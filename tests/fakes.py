"""Kernel stand-ins for tests about something else (AMI, DNS, dial-in, the store);
the namespace tests use real nftables."""

from __future__ import annotations

from datetime import datetime

from tm4.core.errors import ApplyError
from tm4.core.rules import Ruleset, SetChanges


class MemoryKernel:
    """Keeps tm4's sets in memory as the kernel would, and records every element batch."""

    def __init__(self) -> None:
        self.sets: dict[str, set[str]] = {}
        self.batches: list[SetChanges] = []

    def apply(self, ruleset: Ruleset, now: datetime | None = None) -> None:
        self.sets = {n: {e.text(s.version) for e in s.elements} for n, s in ruleset.sets.items() if not s.dynamic}

    def apply_changes(self, changes: SetChanges, now: datetime | None = None) -> None:
        self.batches.append(changes)
        for name, elems in changes.delete.items():
            for e in elems:
                self.sets.setdefault(name, set()).discard(e.text(changes.versions[name]))
        for name, elems in changes.add.items():
            for e in elems:
                self.sets.setdefault(name, set()).add(e.text(changes.versions[name]))

    def present(self) -> bool:
        return True

    def listing(self, terse: bool = False) -> str | None:
        return ""

    def remove(self) -> None:
        self.sets = {}

    def addresses(self) -> set[str]:
        return {a for s in self.sets.values() for a in s}


class RefusingKernel(MemoryKernel):
    """A kernel that has tm4's table but refuses every new rule set."""

    def apply(self, ruleset: Ruleset, now: datetime | None = None) -> None:
        raise ApplyError("nft refused the change: simulated")
