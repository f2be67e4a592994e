"""Drift: has someone changed tm4's kernel table from outside?

Only what tm4 renders from the store is compared: the rules (the kernel's own
listing with set contents cut out, against the listing saved right after the last
apply) and the elements of the sets tm4 fills. Sets the kernel fills by itself
(dynamic: knock stages, meters) are never compared; a repair is a full apply,
which carries their live elements over.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from tm4.core.errors import ApplyError
from tm4.core.rules import interval_text
from tm4.firewall.plan import _parse_elem
from tm4.ops.engine import Core, _rules_part, rules_fingerprint

# Elements this close to their expiry may already be gone from one side: not drift.
EXPIRY_SLACK = timedelta(seconds=3)


@dataclass
class DriftReport:
    missing: bool = False
    rules: list[str] = field(default_factory=list)  # diff lines, expected (-) vs kernel (+)
    missing_elements: dict[str, list[str]] = field(default_factory=dict)
    extra_elements: dict[str, list[str]] = field(default_factory=dict)
    stale_config: bool = False  # not drift: the rules in force come from a config tm4d has not loaded

    def __bool__(self) -> bool:
        return self.missing or bool(self.rules or self.missing_elements or self.extra_elements)

    def summary(self) -> str:
        if self.missing:
            return "table inet tm4 missing (flushed or deleted)"
        parts = []
        if self.rules:
            changed = [ln for ln in self.rules if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
            parts.append(f"rules changed ({len(changed)} line(s): {'; '.join(changed[:3])})")
        for name, els in sorted(self.missing_elements.items()):
            parts.append(f"{name}: {len(els)} element(s) missing ({', '.join(els[:3])})")
        for name, els in sorted(self.extra_elements.items()):
            parts.append(f"{name}: {len(els)} element(s) added from outside ({', '.join(els[:3])})")
        return "; ".join(parts)


def check(core: Core, *, elements: bool = True, now: datetime | None = None) -> DriftReport:
    """Compare the kernel with the last apply. An empty report means no drift."""
    report = DriftReport()
    try:  # terse: without set contents, cheap even with 100,000 bans
        listing = core.backend.listing(terse=True)  # type: ignore[call-arg]
    except TypeError:
        listing = core.backend.listing()
    if listing is None:
        report.missing = True
        return report
    expected = core.store.get_meta("applied_listing")
    got = _rules_part(listing)
    if expected is not None and got != expected:
        report.rules = list(difflib.unified_diff(expected.splitlines(), got.splitlines(),
                                                 "applied", "kernel", n=0, lineterm=""))[:40]
    if elements:
        _check_elements(core, report, now or core.clock())
    return report


def _kernel_sets(core: Core) -> dict[str, list[object]] | None:
    runner = getattr(core.backend, "runner", None)
    if runner is None:
        return None
    try:
        data = json.loads(runner.run("list table inet tm4", json_out=True) or "{}")
    except (ApplyError, ValueError):
        return None
    return {o["set"]["name"]: list(o["set"].get("elem", []))
            for o in data.get("nftables", []) if "set" in o}


def _expiring(e: object) -> bool:
    if isinstance(e, dict) and "elem" in e:
        exp = e["elem"].get("expires")
        return exp is not None and exp < EXPIRY_SLACK.total_seconds()
    return False


def _check_elements(core: Core, report: DriftReport, now: datetime) -> None:
    rs = core.render()
    if rules_fingerprint(rs) != core.store.get_meta("applied_rules"):
        # The last apply came from another config (an admin's `tm4 apply` with an edited
        # file that tm4d has not reloaded): our rendering is not what is in force.
        report.stale_config = True
        return
    kernel = _kernel_sets(core)
    if kernel is None:
        return
    for name, s in rs.sets.items():
        if s.dynamic:
            continue
        want = {(e.lo, e.hi) for e in s.elements if e.expires is None or e.expires > now + EXPIRY_SLACK}
        soon = {(e.lo, e.hi) for e in s.elements if e.expires is not None and e.expires <= now + EXPIRY_SLACK}
        if name not in kernel:
            report.rules.append(f"- set {name}")
            continue
        have = {iv for iv in (_parse_elem(e) for e in kernel[name]) if iv is not None}
        fading = {iv for iv in (_parse_elem(e) for e in kernel[name] if _expiring(e)) if iv is not None}
        miss = want - have
        extra = have - want - soon - fading
        if miss:
            report.missing_elements[name] = [interval_text(s.version, lo, hi) for lo, hi in sorted(miss)]
        if extra:
            report.extra_elements[name] = [interval_text(s.version, lo, hi) for lo, hi in sorted(extra)]
