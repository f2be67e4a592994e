"""What tm4d answers on its control socket.

Members of daemon.asterisk_group may call only the dial-in operations; root may call
those, every operation of tm4.ops.root (through a core whose lock-out guard watches the
caller's SSH address), and the daemon's own: status, ping, reload, apply, drift_check.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tm4.core.errors import ApplyError, ConfigError, ConflictError, ValidationError
from tm4.core.model import Origin
from tm4.daemon.reload import reload_config
from tm4.ops.control import Peer, PermissionDenied
from tm4.ops.engine import Core
from tm4.ops.requests import check_args

if TYPE_CHECKING:
    from tm4.daemon.host import Daemon

log = logging.getLogger("tm4.daemon")

READ_ONLY = {"entries", "entry", "bans", "log", "safe_mode", "status", "ping", "drift_check", "quarantine"}


def dialin_ops() -> dict[str, Callable[[Core, dict[str, Any]], Any]]:
    try:
        mod = importlib.import_module("tm4.dialin.ops")
    except Exception as exc:
        log.debug("event=dialin_ops_missing reason=%r", exc)
        return {}
    return dict(getattr(mod, "DIALIN_OPS", {}))


async def handle(d: Daemon, peer: Peer, op: str, args: dict[str, Any]) -> Any:
    dialin = dialin_ops()
    if peer.role != "root" and op not in dialin:
        raise PermissionDenied(f"permission denied: the {d.config.daemon.asterisk_group} group may"
                               f" only call {', '.join(sorted(dialin)) or 'the dial-in operations'}")
    check_args(op, args)  # the JSON shape, before any operation sees it
    if op in dialin:
        result = dialin[op](d.core, args)
        d.after_change(op)
        return result
    args = dict(args)
    args["actor"] = peer.actor
    if op in DAEMON_OPS:
        out = DAEMON_OPS[op](d, args)
        return await out if inspect.isawaitable(out) else out
    from tm4.ops.root import ROOT_OPS

    func = ROOT_OPS.get(op)
    if func is None:
        raise ValidationError(f"unknown operation {op!r}")
    core = _request_core(d, args)
    result = func(core, args)
    if op not in READ_ONLY:
        d.after_change(op)
        if d.refresher is not None and op == "allow":
            d.refresher.wake()
    return result


def _request_core(d: Daemon, args: dict[str, Any]) -> Core:
    """The daemon's core, with the lock-out guard watching the caller's SSH address."""
    from tm4.core.model import parse_network

    clients = args.pop("ssh_clients", None)
    if args.get("force"):
        protect = []
    elif isinstance(clients, list) and all(isinstance(c, str) for c in clients):
        protect = [parse_network(c, force=True) for c in clients]
    else:
        protect = []
    return Core(d.config, backend=d.core.backend, store=d.core.store, clock=d.core.clock, protect=protect)


# -- the daemon's own operations (root only) -------------------------------------

def _op_status(d: Daemon, a: dict[str, Any]) -> Any:
    return d.status()


def _op_ping(d: Daemon, a: dict[str, Any]) -> Any:
    return {"pong": True, "pid": os.getpid()}


async def _op_reload(d: Daemon, a: dict[str, Any]) -> Any:
    return await reload_config(d)


async def _op_apply(d: Daemon, a: dict[str, Any]) -> Any:
    """`tm4 apply` while tm4d runs: the admin edited the config and wants it in force, so
    the config is read again first (a broken file is refused; the running one stays)."""
    if d.disabled():
        raise ConflictError("tm4 is disabled: `tm4 enable` loads the rules again")
    res = await reload_config(d)
    if not res["reloaded"]:
        raise ConfigError(f"not applied, the config is broken (the running one stays): {res['error']}")
    if not res["applied"]:
        raise ApplyError("the kernel refused the rule set; the previous one stays in force (see tm4d's log)")
    actor = a.get("actor") if isinstance(a.get("actor"), str) else ""
    d.core.audit("apply", "ruleset", Origin.ADMIN, actor, changed=res["changed"])
    return {"applied": True, "last_apply": d.core.store.get_meta("last_apply"),
            "changed": res["changed"], "needs_restart": res["needs_restart"]}


async def _op_drift_check(d: Daemon, a: dict[str, Any]) -> Any:
    report = await d.drift.check()
    return {"drift": bool(report), "found": report.summary()}


DAEMON_OPS: dict[str, Callable[[Daemon, dict[str, Any]], Any]] = {
    "status": _op_status,
    "ping": _op_ping,
    "reload": _op_reload,
    "apply": _op_apply,
    "drift_check": _op_drift_check,
}
