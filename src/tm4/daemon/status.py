"""`tm4 status`: the table, the counts, the last apply, and drift between store and kernel."""

from __future__ import annotations

import time
from typing import Any

from tm4.firewall.plan import make_plan
from tm4.ops import confirm
from tm4.ops.engine import Core, _rules_part, rules_fingerprint


def gather_status(core: Core) -> dict[str, Any]:
    listing = core.backend.listing(terse=True)  # type: ignore[call-arg]
    entries = core.entries()
    st: dict[str, Any] = {
        "table_present": listing is not None,
        "entries": len(entries),
        "stale": sum(1 for e in entries if e.stale_since),
        "bans": len(core.bans()),
        "last_apply": core.store.get_meta("last_apply"),
        "drift": "",
        "pending_confirm": None,
        "extra": {},
    }
    if listing is not None:
        rs = core.render()
        plan = make_plan(rs, core.backend, core.store.get_meta("applied_rules"),  # type: ignore[arg-type]
                         rules_fingerprint(rs), core.clock())
        kernel_rules_changed = _rules_part(listing) != (core.store.get_meta("applied_listing") or "")
        parts = []
        if plan.rules_changed:
            parts.append("rules differ from the config (run `tm4 apply`)")
        elif kernel_rules_changed:
            parts.append("kernel rules changed from outside")
        n_add = sum(map(len, plan.add.values()))
        n_rm = sum(map(len, plan.remove.values()))
        if n_add or n_rm:
            parts.append(f"{n_add} element(s) missing from the kernel, {n_rm} extra")
        st["drift"] = "; ".join(parts)
    from tm4.daemon.main import status_extra

    st["extra"].update(status_extra(core))
    from tm4.sources.fail2ban import status_lines

    st["extra"].update(status_lines(core))
    guard = _guard_status(core)
    if guard is not None:
        st["guard"] = guard
        st["extra"]["guard"] = guard.get("summary") or guard.get("state")
    pend = confirm.pending(core)
    if pend:
        st["pending_confirm"] = max(0, int(pend["deadline"] - time.time()))
    return st


def _guard_status(core: Core) -> dict[str, Any] | None:
    """The guard's AMI session as tm4d reports it; None when tm4d does not run it."""
    from tm4.ops.control import daemon_running, request

    path = core.config.daemon.socket
    if not daemon_running(path):
        return None
    try:
        st = request(path, "status", timeout=5.0)
    except Exception:  # Tm4Error, OSError: the rest of `tm4 status` still stands
        return None
    guard = (st.get("components") or {}).get("guard")
    return guard if isinstance(guard, dict) else None

