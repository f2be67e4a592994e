"""The operations the control socket offers root, as plain functions of (core, args).

tm4d runs them for a client; the CLI runs the very same functions directly when
tm4d is not running, so both ways give the same results. Arguments and results
are JSON values only. The dial-in operations (the only ones the Asterisk group
may call) live in `tm4.dialin.ops.DIALIN_OPS` and are added by the server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tm4.core.durations import parse_duration
from tm4.core.errors import ApplyError, ConflictError, NotFoundError, ValidationError
from tm4.core.model import Origin, format_time, utcnow
from tm4.ops.engine import Core
from tm4.ops.requests import check_args

OpFunc = Callable[[Core, dict[str, Any]], Any]
DISABLED_KEY = "disabled"  # store meta: set while `tm4 disable` is in force


def _str(args: dict[str, Any], key: str, default: str | None = None) -> str:
    v = args.get(key, default)
    if not isinstance(v, str) or (default is None and not v):
        raise ValidationError(f"argument {key!r} must be a non-empty string")
    return v


def _strs(args: dict[str, Any], key: str) -> list[str]:
    v = args.get(key, [])
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValidationError(f"argument {key!r} must be a list of strings")
    return v


def _bool(args: dict[str, Any], key: str) -> bool:
    v = args.get(key, False)
    if not isinstance(v, bool):
        raise ValidationError(f"argument {key!r} must be true or false")
    return v


def _ttl(args: dict[str, Any]) -> Any:
    v = args.get("ttl")
    return None if v in (None, "") else parse_duration(v)


def _origin(args: dict[str, Any], default: Origin = Origin.ADMIN) -> Origin:
    try:
        return Origin(args.get("origin", default))
    except ValueError:
        raise ValidationError(f"unknown origin {args.get('origin')!r}") from None


def op_allow(core: Core, a: dict[str, Any]) -> Any:
    e = core.allow(_str(a, "name"), _strs(a, "sources"), _strs(a, "services"), ttl=_ttl(a),
                   note=_str(a, "note", ""), origin=_origin(a), actor=_str(a, "actor", ""),
                   replace=_bool(a, "replace"), force=_bool(a, "force"), endpoints=_strs(a, "endpoints"),
                   zone=_str(a, "zone", "") or None)
    return e.to_json()


def op_revoke(core: Core, a: dict[str, Any]) -> Any:
    return core.revoke(_str(a, "name"), origin=_origin(a), actor=_str(a, "actor", "")).to_json()


def op_block(core: Core, a: dict[str, Any]) -> Any:
    offences = a.get("offences")
    if offences is not None and (not isinstance(offences, int) or isinstance(offences, bool)):
        raise ValidationError("argument 'offences' must be a whole number")
    b = core.block(_str(a, "address"), ttl=_ttl(a), reason=_str(a, "reason", ""), origin=_origin(a),
                   actor=_str(a, "actor", ""), offences=offences, force=_bool(a, "force"))
    return b.to_json()


def op_unblock(core: Core, a: dict[str, Any]) -> Any:
    return core.unblock(_str(a, "address"), origin=_origin(a), actor=_str(a, "actor", "")).to_json()


def op_entries(core: Core, a: dict[str, Any]) -> Any:
    return [e.to_json() for e in core.entries()]


def op_entry(core: Core, a: dict[str, Any]) -> Any:
    return core.get_entry(_str(a, "name")).to_json()


def op_bans(core: Core, a: dict[str, Any]) -> Any:
    return [b.to_json() for b in core.bans()]


def op_apply(core: Core, a: dict[str, Any]) -> Any:
    core.apply()
    core.audit("apply", "ruleset", Origin.ADMIN, _str(a, "actor", ""))
    return {"applied": True, "last_apply": core.store.get_meta("last_apply")}


def op_sweep(core: Core, a: dict[str, Any]) -> Any:
    entries, bans = core.sweep()
    return {"entries": entries, "bans": bans}


def op_log(core: Core, a: dict[str, Any]) -> Any:
    limit = a.get("limit", 50)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10000:
        raise ValidationError("argument 'limit' must be 1-10000")
    subject = a.get("subject")
    return [r.to_json() for r in core.store.audit_log(limit, subject if isinstance(subject, str) else None)]


def op_quarantine(core: Core, a: dict[str, Any]) -> Any:
    """Rows set aside because they no longer parse (tm4.core.store: never fatal); `scan`
    (default) parses every entry and ban first, so the list is complete."""
    if a.get("scan", True) is not False:
        core.store.quarantine_scan()
    return [q.to_json() for q in core.store.quarantined()]


def op_quarantine_drop(core: Core, a: dict[str, Any]) -> Any:
    ids = a.get("ids")
    if _bool(a, "all"):
        gone = core.store.drop_quarantined(None)
    elif isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        known = {q.id for q in core.store.quarantined()}
        missing = [i for i in ids if i not in known]
        if missing:
            raise NotFoundError(f"no quarantined row with id {', '.join(map(str, missing))} "
                                "(see `tm4 quarantine list`)")
        gone = core.store.drop_quarantined(ids)
    else:
        raise ValidationError("give the ids of quarantined rows (whole numbers) or all")
    core.audit("quarantine_drop", "quarantine", Origin.ADMIN, _str(a, "actor", ""),
               ids="all" if _bool(a, "all") else ids, dropped=gone)
    return {"dropped": gone}


def op_safe_mode_off(core: Core, a: dict[str, Any]) -> Any:
    from tm4.ops import safemode

    was_on = safemode.turn_off(core, actor=_str(a, "actor", ""))
    if was_on and core.backend.present():
        core.apply()
    return {"was_on": was_on}


def op_safe_mode(core: Core, a: dict[str, Any]) -> Any:
    from tm4.ops import safemode

    until = safemode.until(core.store, core.clock())
    return {"active": until is not None, "until": format_time(until)}


def disable(core: Core, actor: str = "") -> dict[str, Any]:
    """The deliberate way to open up: drop the table and keep it dropped (tm4d and
    tm4-boot honour the mark), unless the lock file exists."""
    lock = Path(core.config.daemon.lock_file)
    if lock.exists():
        raise ConflictError(f"{lock} exists: this firewall is locked on; remove the file to allow `tm4 disable`")
    core.store.set_meta(DISABLED_KEY, format_time(utcnow()))
    with contextlib.suppress(ApplyError):  # not loaded: nothing to remove
        core.backend.remove()
    core.audit("disable", "inet tm4", Origin.ADMIN, actor)
    from tm4.core.notify import alert

    alert("disabled", "firewall DISABLED: table inet tm4 removed; `tm4 enable` loads it again", actor=actor)
    return {"disabled": True}


def enable(core: Core, actor: str = "") -> dict[str, Any]:
    core.apply()
    core.store.set_meta(DISABLED_KEY, None)
    core.audit("enable", "inet tm4", Origin.ADMIN, actor)
    return {"disabled": False, "last_apply": core.store.get_meta("last_apply")}


def op_disable(core: Core, a: dict[str, Any]) -> Any:
    return disable(core, _str(a, "actor", ""))


def op_enable(core: Core, a: dict[str, Any]) -> Any:
    return enable(core, _str(a, "actor", ""))


ROOT_OPS: dict[str, OpFunc] = {
    "allow": op_allow,
    "revoke": op_revoke,
    "block": op_block,
    "unblock": op_unblock,
    "entries": op_entries,
    "entry": op_entry,
    "bans": op_bans,
    "apply": op_apply,
    "sweep": op_sweep,
    "log": op_log,
    "quarantine": op_quarantine,
    "quarantine_drop": op_quarantine_drop,
    "safe_mode": op_safe_mode,
    "safe_mode_off": op_safe_mode_off,
    "disable": op_disable,
    "enable": op_enable,
}


def run_local(core: Core, op: str, args: dict[str, Any] | None = None,
              more_ops: Mapping[str, OpFunc] | None = None) -> Any:
    """Run an operation in this process (the admin fallback when tm4d is not running):
    a root operation, or one of `more_ops` (the CLI passes the dial-in operations, which
    live above this layer)."""
    func = ROOT_OPS.get(op) or (more_ops or {}).get(op)
    if func is None:
        raise ValidationError(f"unknown operation {op!r}")
    args = dict(args or {})
    check_args(op, args)  # the schema tm4d checks too: both ways refuse alike
    return func(core, args)
