"""Toll-fraud paths: from the contexts endpoints land in, wildcard patterns and
international prefixes that dial a trunk, with the chain of includes that makes
them reachable; trunks dialled with no limit on simultaneous calls."""

from __future__ import annotations

from tm4.asterisk.audit.access import trunk_dials
from tm4.asterisk.audit.dialplan import (
    Dialplan,
    chain_text,
    dial_targets,
    is_international,
    is_wildcard,
    reachable,
)
from tm4.asterisk.audit.finding import Finding, make
from tm4.asterisk.audit.pbx import Pbx


def check_dialplan(pbx: Pbx, dp: Dialplan) -> list[Finding]:
    out: list[Finding] = []
    seen: set[tuple[str, str, str]] = set()
    for e in sorted(pbx.endpoints, key=lambda e: (e.tech, e.name)):
        if e.kind not in ("phone", "other"):
            continue  # anonymous endpoints: tm4.asterisk.audit.access; trunks: inbound calls
        chains = reachable(dp, e.context, e.where, "context=")
        for cname, pattern, trunk, where in trunk_dials(dp, pbx, list(chains)):
            path = f"{e.label} -> {chain_text(chains[cname])}"
            if is_international(pattern) and ("intl", cname, pattern) not in seen:
                seen.add(("intl", cname, pattern))
                out.append(make(
                    "dialplan-international", "medium", where,
                    f"international numbers routed out: {pattern} in [{cname}] dials {trunk}",
                    f"Extension {pattern} in [{cname}] sends numbers starting 00/011/+ to {trunk}, and "
                    f"endpoints reach it: {path}. International premium-rate numbers are what "
                    "fraudsters call with stolen extensions.",
                    "Remove international routes you do not need, or put them in a context only trusted "
                    "endpoints use, behind a PIN (Authenticate()) and a call limit.",
                ))
            if is_wildcard(pattern) and ("wild", cname, pattern) not in seen:
                seen.add(("wild", cname, pattern))
                out.append(make(
                    "dialplan-wildcard-to-trunk", "medium", where,
                    f"wildcard {pattern} in [{cname}] dials anything through {trunk}",
                    f"Extension {pattern} in [{cname}] passes any number to {trunk}, and endpoints reach it: "
                    f"{path}. One stolen extension can call any destination, premium and international included.",
                    f"Replace {pattern} with patterns for the numbers you call (e.g. your national format "
                    "_0ZXXXXXXXX), and keep international routes separate.",
                ))
    return out


def check_call_limits(pbx: Pbx, dp: Dialplan) -> list[Finding]:
    """A trunk some context dials without GROUP_COUNT in that extension (and, for
    chan_sip, without call-limit) can carry as many fraudulent calls as the provider allows."""
    limited_by_group: set[str] = set()
    dialled: dict[str, str] = {}
    for cname, ctx in dp.contexts.items():
        for steps in ctx.extensions().values():
            grouped = any("GROUP_COUNT" in s.args.upper() or "GROUP(" in s.args.upper() for s in steps)
            for tech, peer in (t for s in steps for t in dial_targets(dp, s)):
                if not pbx.is_trunk(tech, peer):
                    continue
                label = f"{tech}/{peer}"
                dialled.setdefault(label, cname)
                if grouped:
                    limited_by_group.add(label)
    out = []
    for t in pbx.trunks():
        if t.label not in dialled or t.label in limited_by_group or t.call_limit:
            continue
        fix = ("Set call-limit=2 on the peer, or " if t.tech == "SIP" else "") + (
            "count calls per trunk in the dialplan before Dial(): "
            f"Set(GROUP()={t.name}) then GotoIf($[${{GROUP_COUNT({t.name})}} > 2]?busy)")
        out.append(make(
            "trunk-no-call-limit", "medium", t.where, f"trunk {t.label} has no limit on simultaneous calls",
            f"{t.label} is dialled from [{dialled[t.label]}] with no cap on concurrent calls. A fraudster with one "
            "extension can run dozens of parallel calls; a cap of one or two calls limits the damage per hour.",
            fix,
        ))
    return out

