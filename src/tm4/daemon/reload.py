"""tm4d reading its config again (SIGHUP, `tm4 daemon reload`, `tm4 apply`): a good file
is applied in one transaction and the components whose sections changed restart; a
broken one is reported and the running configuration kept."""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from tm4.core import notify
from tm4.core.config import Config, load_config
from tm4.core.errors import ConfigError

if TYPE_CHECKING:
    from tm4.daemon.host import Daemon

log = logging.getLogger("tm4.daemon")


def needs_restart(old: Config, new: Config) -> list[str]:
    """Changed keys a reload cannot take over: tm4d must be restarted for them."""
    fixed = [k for k in ("state_dir",) if getattr(new, k) != getattr(old, k)]
    fixed += [f"firewall.{k}" for k in ("backend", "netns")
              if getattr(new.firewall, k) != getattr(old.firewall, k)]
    fixed += [f"daemon.{k}" for k in ("socket", "asterisk_group")
              if getattr(new.daemon, k) != getattr(old.daemon, k)]
    return fixed


def changed_sections(old: Config, new: Config) -> list[str]:
    return [f.name for f in fields(Config) if f.name not in ("path", "raw")
            and getattr(new, f.name) != getattr(old, f.name)]


async def reload_config(d: Daemon) -> dict[str, Any]:
    """Read the config again; on any error keep running with the old one."""
    try:
        new = load_config(d.config_path)
    except ConfigError as exc:
        d.last_reload_error = str(exc)
        log.error("event=reload_failed reason=%r action=keeping the running configuration", str(exc))
        notify.alert("config_error", f"config not reloaded, running configuration kept: {exc}")
        return {"reloaded": False, "error": str(exc)}
    old = d.config
    fixed = needs_restart(old, new)
    changed = changed_sections(old, new)
    d.config = new
    d.core.config = new
    d.notifier.command = list(new.daemon.notify_command)
    d.notifier.timeout = d.seconds(new.daemon.notify_timeout)
    d.reloads += 1
    d.last_reload_error = ""
    d.drift.stale_warned = False
    ok = d.apply_all("reload")
    if new.daemon.drift_interval != old.daemon.drift_interval:
        d.drift.interval = d.seconds(new.daemon.drift_interval)
        d.tasks["drift"].cancel()
        d.spawn("drift", d.every(d.drift.interval, d.drift.drift_tick))
    if new.daemon.sweep_interval != old.daemon.sweep_interval:
        d.tasks["sweeper"].cancel()
        d.spawn("sweeper", d.every(d.seconds(new.daemon.sweep_interval), d.sweep))
    for c in d.components:
        if c.task is None and c.state in ("off", "missing", "pending"):
            c.start(d)
        elif set(c.sections) & set(changed) or not c.wanted(new):
            await c.stop()
            c.start(d)
    d.after_change("reload")
    if fixed:
        log.warning("event=reload_partial needs_restart=%s", ",".join(fixed))
    log.info("event=reloaded changed=%s applied=%s", ",".join(changed) or "-", ok)
    return {"reloaded": True, "changed": changed, "applied": ok, "needs_restart": fixed}
