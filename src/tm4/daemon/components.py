"""The parts tm4d hosts — AMI guard, DNS refresher, FastAGI server, knock watcher — and
their supervision.

Each component's module is imported only when the component starts: a missing module
is reported as missing, a crash is logged, alerted and restarted with backoff. Neither
ever takes the firewall down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tm4.core import notify
from tm4.core.config import Config
from tm4.core.errors import ConfigError

if TYPE_CHECKING:
    from tm4.daemon.host import Daemon

log = logging.getLogger("tm4.daemon")

KNOCK_INTERVAL = 1.0
BLOCKLIST_INTERVAL = 60.0  # how often tm4d looks for lists due a refresh
MAX_BACKOFF = 60.0


@dataclass
class Component:
    """A hosted part of tm4d: `run(daemon)` is a coroutine that runs until cancelled."""

    name: str
    module: str  # imported lazily; missing → the component is reported as missing
    run: Callable[[Daemon, Any], Awaitable[None]]
    sections: tuple[str, ...] = ()  # config sections whose change restarts it
    wanted: Callable[[Config], bool] = lambda cfg: True
    state: str = "pending"  # pending, running, missing, failed, off, stopped
    error: str = ""
    restarts: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    # What the running part says of itself (the guard: its AMI session); its "state" and
    # "error" override the supervisor's while it runs.
    detail: Callable[[], dict[str, Any]] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "error": self.error or None, "restarts": self.restarts}
        if self.detail is not None and self.state == "running":
            try:
                out.update(self.detail())
            except Exception as exc:  # a status report must not break `tm4 daemon status`
                out["error"] = f"status unavailable: {exc}"
        return out

    def start(self, daemon: Daemon) -> None:
        if not self.wanted(daemon.config):
            self.state, self.error = "off", ""
            return
        try:
            mod = importlib.import_module(self.module)
        except Exception as exc:  # ImportError, or a syntax error in a half-written module
            self.state, self.error = "missing", f"{type(exc).__name__}: {exc}"
            log.warning("event=component_missing component=%s module=%s reason=%r", self.name, self.module,
                        self.error)
            return
        self.task = asyncio.ensure_future(self._supervise(daemon, mod))

    async def _supervise(self, daemon: Daemon, mod: Any) -> None:
        delay = 1.0
        while True:
            self.state, started = "running", time.monotonic()
            try:
                await self.run(daemon, mod)
                self.state = "stopped"
                log.info("event=component_stopped component=%s", self.name)
                return
            except asyncio.CancelledError:
                self.state = "stopped"
                raise
            except ImportError as exc:
                self.state, self.error = "missing", str(exc)
                log.warning("event=component_missing component=%s reason=%r", self.name, self.error)
                return
            except Exception as exc:
                self.state, self.error, self.restarts = "failed", f"{type(exc).__name__}: {exc}", self.restarts + 1
                log.error("event=component_failed component=%s reason=%r restart_in=%.0fs", self.name,
                          self.error, delay, exc_info=exc)
                notify.alert("component_failed", f"{self.name} crashed: {self.error}; restarting",
                             component=self.name)
            if time.monotonic() - started > 60:
                delay = 1.0
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
            self.task = None


async def _run_dns(d: Daemon, mod: Any) -> None:
    refresher = mod.Refresher(d.core, on_change=lambda results: d.after_change("dns"))
    d.refresher = refresher
    try:
        await refresher.run_forever()
    finally:
        d.refresher = None


async def _run_guard(d: Daemon, mod: Any) -> None:
    rt = mod.GuardRuntime(d.core, on_decision=d.guard_decision)
    d.guard = rt
    me = next((c for c in d.components if c.name == "guard"), None)
    if me is not None:
        me.detail = rt.status  # "running" only while logged in to AMI
    try:
        await rt.run()
    finally:
        d.guard = None
        if me is not None:
            me.detail = None
        with contextlib.suppress(Exception):
            await rt.close()


async def _run_fastagi(d: Daemon, mod: Any) -> None:
    host, _, port = d.config.daemon.fastagi.rpartition(":")
    try:
        app = await mod.start_fastagi(d.core, host.strip("[]") or "127.0.0.1", int(port))
    except ValueError:
        raise ConfigError(f"daemon.fastagi {d.config.daemon.fastagi!r} must be HOST:PORT") from None
    d.fastagi = app
    log.info("event=fastagi_listening address=%s", d.config.daemon.fastagi)
    try:
        await asyncio.Event().wait()  # serve until cancelled
    finally:
        d.fastagi = None
        with contextlib.suppress(Exception):
            await app.close()


async def _run_knock(d: Daemon, mod: Any) -> None:
    while True:
        made = mod.activate_knocks(d.core)
        for e in made:
            log.info("event=knock_activated entry=%s address=%s", e.name, ",".join(s.text for s in e.sources))
        if made:
            d.after_change("knock")
        await asyncio.sleep(KNOCK_INTERVAL)


async def _run_blocklists(d: Daemon, mod: Any) -> None:
    # Fetching runs in a worker thread; the store and the kernel are touched on the loop.
    while True:
        chosen = mod.due(d.core, due_only=True)
        if chosen:
            results = await asyncio.to_thread(mod.load, d.core, chosen)
            mod.save(d.core, chosen, results)
            for r in results:
                log.info("event=blocklist_refresh list=%s changed=%s error=%r", r.name, r.changed, r.error)
        await asyncio.sleep(BLOCKLIST_INTERVAL)


def _fail2ban_wanted(cfg: Config) -> bool:
    # [fail2ban] enabled; "auto": installed, and tm4d guards the host, not a namespace.
    from tm4.sources.fail2ban import wanted

    return wanted(cfg, _in_netns())


def _in_netns() -> bool:
    # tm4d started with `ip netns exec` (the lab, tests) is not the host's firewall.
    try:
        return os.readlink("/proc/self/ns/net") != os.readlink("/proc/1/ns/net")
    except OSError:
        return False


async def _run_fail2ban(d: Daemon, mod: Any) -> None:
    # Debounced: one drop-in write and jail reload once the whitelist has been still.
    # Only while fail2ban runs (it reads the drop-in when it starts); stopped, it is
    # looked at again every 30 s.
    cfg = d.core.config
    f2b, settle, probe = mod.Fail2ban.from_config(cfg), mod.Debounce(mod.settle_seconds(cfg)), 0.0
    while True:
        addrs = mod.ignore_list(d.core.entries(), d.core.clock())
        key, now = mod.digest(addrs), time.monotonic()
        if settle.ready(key, now) and now >= probe:
            res = await asyncio.to_thread(functools.partial(mod.push, f2b, addrs, only_if_running=True))
            if res is None:
                probe = now + 30.0
                await asyncio.sleep(1.0)
                continue
            settle.done(key)
            if res.written:
                log.info("event=fail2ban_sync addresses=%d reloaded=%s failed=%s", res.addresses,
                         ",".join(res.reloaded), ",".join(res.failed))
        await asyncio.sleep(1.0)


async def _run_zones(d: Daemon, mod: Any) -> None:
    # Restarted whenever [zones] or [services] change: members follow their zone once, then wait.
    try:
        changed = mod.reconcile(d.core, actor="tm4d")
    except ConfigError as exc:  # a zone in use was deleted: members keep their services
        log.error("event=zone_in_use reason=%r", str(exc))
        notify.alert("zone_in_use", str(exc))
        changed = []
    if changed:
        log.info("event=zone_members_updated entries=%s", ",".join(changed))
        d.after_change("zones")
    await asyncio.Event().wait()


def default_components() -> list[Component]:
    return [
        Component("guard", "tm4.guard.runtime", _run_guard, ("ami", "guard", "firewall"),
                  wanted=lambda cfg: bool(cfg.ami.secret)),
        Component("dns", "tm4.dns.refresher", _run_dns, ("dns",)),
        Component("fastagi", "tm4.dialin.fastagi", _run_fastagi, ("daemon", "dialin"),
                  wanted=lambda cfg: bool(cfg.daemon.fastagi)),
        Component("knock", "tm4.knock.sequence", _run_knock, ("knock",),
                  wanted=lambda cfg: cfg.knock.enabled and cfg.knock.activate),
        Component("blocklists", "tm4.sources.blocklists", _run_blocklists),
        Component("zones", "tm4.ops.zones", _run_zones, ("zones", "services")),
        Component("fail2ban", "tm4.sources.fail2ban", _run_fail2ban, ("fail2ban",),
                  wanted=_fail2ban_wanted),
    ]
