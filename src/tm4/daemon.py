"""tm4d: the one long-running process that owns the kernel rules.

One asyncio loop, run as root. Start-up: open the store, re-check bans against
the whitelist (the whitelist always wins), decide safe mode, apply the whole rule
set in one transaction, then start the hosted components: the control socket,
the expiry sweeper, the drift check, the knock watcher, and — when their modules
are installed — the AMI guard, the DNS refresher with the Asterisk ACL sync, and
the FastAGI server. A component that is missing or crashes is logged (and a crash
restarted with backoff); it never takes the firewall down.

Everything touching the core runs on the loop's thread, one step at a time, so
the store and the kernel are never written by two tasks at once.

Stopping tm4d leaves the rules in force (fail closed). SIGHUP reloads the config;
a broken file is reported and the running configuration kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib
import inspect
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import IO, Any

from . import coexist, drift, notify, safemode
from .config import Config, load_config
from .control import ControlServer, Peer, PermissionDenied
from .core import Core
from .errors import ApplyError, ConfigError, ConflictError, Tm4Error, ValidationError
from .model import Origin, format_time, utcnow
from .ops import DISABLED_KEY
from .store import Store

log = logging.getLogger("tm4.daemon")

HEARTBEAT = safemode.HEARTBEAT.total_seconds()
KNOCK_INTERVAL = 1.0
ELEMENT_CHECK_EVERY = 5  # compare set elements on every 5th drift check (rules on every one)
MAX_BACKOFF = 60.0
ACL_RETRY = 30.0


# -- components ------------------------------------------------------------------

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

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.error or None, "restarts": self.restarts}


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
    try:
        await rt.run()
    finally:
        d.guard = None
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


def default_components() -> list[Component]:
    return [
        Component("guard", "tm4.guard_runtime", _run_guard, ("ami", "guard", "firewall"),
                  wanted=lambda cfg: bool(cfg.ami.secret)),
        Component("dns", "tm4.dns", _run_dns, ("dns",)),
        Component("fastagi", "tm4.fastagi", _run_fastagi, ("daemon", "dialin"),
                  wanted=lambda cfg: bool(cfg.daemon.fastagi)),
        Component("knock", "tm4.knock", _run_knock, ("knock",),
                  wanted=lambda cfg: cfg.knock.enabled and cfg.knock.activate),
    ]


# -- the daemon ------------------------------------------------------------------

class Daemon:
    def __init__(self, config_path: str | None = None, *, config: Config | None = None,
                 core: Core | None = None, components: list[Component] | None = None):
        self.config_path = config_path
        self.config = config or load_config(config_path)
        # protect=[]: the lock-out guard is about the CLIENT's SSH session, which each
        # request carries; the daemon's own ancestry means nothing.
        self.core = core or Core(self.config, protect=[])
        self.components = default_components() if components is None else components
        self.notifier = notify.Notifier(self.config.daemon.notify_command,
                                        self._seconds(self.config.daemon.notify_timeout))
        self.server: ControlServer | None = None
        self.refresher: Any = None
        self.guard: Any = None
        self.fastagi: Any = None
        self.guard_stats: dict[str, Any] = {"bans": 0, "last": None}
        self.started = time.time()
        self.stopping = asyncio.Event()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.neighbours: list[coexist.Neighbour] = []
        self.drift_repairs = 0
        self.last_drift: dict[str, Any] | None = None
        self.last_check: float | None = None
        self.reloads = 0
        self.last_reload_error = ""
        self._stale: set[str] = set()
        self._audit_seen = 0
        self._lock_fh: IO[str] | None = None
        self._checks = 0
        self._next_element_check = ELEMENT_CHECK_EVERY
        self._drift_interval = self._seconds(self.config.daemon.drift_interval)
        self._drift_pool = ThreadPoolExecutor(1, thread_name_prefix="tm4-drift")
        self._dcore: Core | None = None
        self._stale_warned = False
        self._acl_wake = asyncio.Event()
        self._acl_why = ""
        self.acl_state = "not started"

    @staticmethod
    def _seconds(text: str) -> float:
        from .durations import parse_duration

        return parse_duration(text).total_seconds()

    # -- start-up ----------------------------------------------------------------
    def lock(self) -> None:
        """One tm4d per state directory."""
        d = self.config.state_dir
        d.mkdir(parents=True, exist_ok=True, mode=0o750)
        fh = open(d / "tm4d.lock", "a+")  # noqa: SIM115 — held for the daemon's life
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise ConflictError(f"another tm4d runs on {d}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._lock_fh = fh

    def recheck_bans(self) -> list[str]:
        """Bans restored from the store that the whitelist now covers are lifted (fail2ban's
        restoreCurrentBans): whitelisted sources are never blocked."""
        lifted: list[str] = []
        with self.core.store.transaction():
            for b in self.core.bans():
                covering = self.core.whitelisted(b.network)
                if covering or b.network.network_address.is_loopback:
                    self.core.store.delete_ban(b.address)
                    why = f"whitelisted by {covering[0].name}" if covering else "loopback"
                    self.core.audit("unblock", b.address, Origin.ADMIN, "tm4d", because=f"{why} at start-up")
                    log.warning("event=ban_lifted address=%s reason=%r", b.address, why)
                    lifted.append(b.address)
        return lifted

    def disabled(self) -> bool:
        return self.core.store.get_meta(DISABLED_KEY) is not None

    def apply_all(self, reason: str) -> bool:
        """The whole rule set in one kernel transaction; on failure the old one stays."""
        if self.disabled():
            log.warning("event=apply_skipped reason=disabled (`tm4 enable` to load the rules)")
            return False
        t0 = time.perf_counter()
        try:
            rs = self.core.apply()
        except ApplyError as exc:
            log.error("event=apply_failed why=%s reason=%s", reason, exc)
            return False
        n = sum(len(s.elements) for s in rs.sets.values())
        log.info("event=applied why=%s sets=%d elements=%d rules=%d ms=%.1f", reason, len(rs.sets), n,
                 len(rs.input_rules), (time.perf_counter() - t0) * 1000)
        return True

    async def start(self) -> None:
        notify.install(self.notifier)
        lifted = self.recheck_bans()
        if lifted:
            log.info("event=bans_rechecked lifted=%d", len(lifted))
        try:
            safemode.evaluate(self.core)
        except Tm4Error as exc:
            log.error("event=safe_mode_failed reason=%s", exc)
        self.apply_all("start-up")
        self._audit_seen = max((r.id for r in self.core.store.audit_log(1)), default=0)
        self._stale = {e.name for e in self.core.entries() if e.stale_since}
        self.detect_neighbours()
        self.server = ControlServer(self.config.daemon.socket, self.handle, self.config.daemon.asterisk_group)
        await self.server.start()
        for c in self.components:
            self._start_component(c)
        self._spawn("sweeper", self._every(self._seconds(self.config.daemon.sweep_interval), self.sweep))
        self._spawn("drift", self._every(self._drift_interval, self.drift_tick))
        self._spawn("heartbeat", self._every(HEARTBEAT, self.heartbeat))
        self._spawn("audit", self._every(1.0, self.watch_audit))
        self._spawn("acl", self.acl_worker())
        self.after_change("start-up")
        sd_notify("READY=1\nSTATUS=rules applied; serving")
        log.info("event=started pid=%d socket=%s components=%s", os.getpid(), self.config.daemon.socket,
                 ",".join(f"{c.name}:{c.state}" for c in self.components))

    def detect_neighbours(self) -> None:
        runner = getattr(self.core.backend, "runner", None)
        if runner is None:
            return
        self.neighbours = coexist.detect(runner)
        for n in self.neighbours:
            log.warning("event=other_firewall kind=%s where=%r input_hook=%s note=%r", n.kind, n.where,
                        n.input_hook, n.note)

    # -- tasks -----------------------------------------------------------------
    def _spawn(self, name: str, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks[name] = task
        task.add_done_callback(lambda t, n=name: self._task_done(n, t))

    def _task_done(self, name: str, t: asyncio.Task[None]) -> None:
        if name.startswith("reload-") and self.tasks.get(name) is t:
            del self.tasks[name]
        if t.cancelled() or self.stopping.is_set():
            return
        exc = t.exception()
        if exc is not None:
            log.error("event=task_died task=%s reason=%r", name, exc, exc_info=exc)

    async def _every(self, seconds: float, step: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                out = step()
                if inspect.isawaitable(out):
                    await out
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one step must not stop the loop for good
                log.exception("event=periodic_failed step=%s", getattr(step, "__name__", step))

    def _start_component(self, c: Component) -> None:
        if not c.wanted(self.config):
            c.state, c.error = "off", ""
            return
        try:
            mod = importlib.import_module(c.module)
        except Exception as exc:  # ImportError, or a syntax error in a half-written module
            c.state, c.error = "missing", f"{type(exc).__name__}: {exc}"
            log.warning("event=component_missing component=%s module=%s reason=%r", c.name, c.module, c.error)
            return
        c.task = asyncio.ensure_future(self._supervise(c, mod))

    async def _supervise(self, c: Component, mod: Any) -> None:
        delay = 1.0
        while True:
            c.state, started = "running", time.monotonic()
            try:
                await c.run(self, mod)
                c.state = "stopped"
                log.info("event=component_stopped component=%s", c.name)
                return
            except asyncio.CancelledError:
                c.state = "stopped"
                raise
            except ImportError as exc:
                c.state, c.error = "missing", str(exc)
                log.warning("event=component_missing component=%s reason=%r", c.name, c.error)
                return
            except Exception as exc:
                c.state, c.error, c.restarts = "failed", f"{type(exc).__name__}: {exc}", c.restarts + 1
                log.error("event=component_failed component=%s reason=%r restart_in=%.0fs", c.name, c.error,
                          delay, exc_info=exc)
                notify.alert("component_failed", f"{c.name} crashed: {c.error}; restarting",
                             component=c.name)
            if time.monotonic() - started > 60:
                delay = 1.0
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _stop_component(self, c: Component) -> None:
        if c.task is not None:
            c.task.cancel()
            with contextlib.suppress(BaseException):
                await c.task
            c.task = None

    def guard_decision(self, rec: Any) -> None:
        """The guard's report of each decision it applied: kept for `tm4 daemon status`."""
        d = rec.decision
        if type(d).__name__ != "BanDecision":
            return
        self.guard_stats["bans"] += 1
        self.guard_stats["last"] = {"address": getattr(d, "address", ""), "error": rec.error or None,
                                    "ms": round((rec.done - rec.received) * 1000, 2)}

    # -- periodic work -----------------------------------------------------------
    def sweep(self) -> None:
        safemode.expire(self.core)
        entries, bans = self.core.sweep()
        if entries or bans:
            log.info("event=swept entries=%s bans=%s", ",".join(entries) or "-", ",".join(bans) or "-")
        stale = {e.name for e in self.core.entries() if e.stale_since}
        for name in sorted(stale - self._stale):
            e = self.core.store.get_entry(name)
            srcs = ",".join(s.text for s in e.sources if s.is_dns) if e else name
            notify.alert("dns_stale", f"entry {name}: DNS name(s) {srcs} no longer resolve; "
                         "keeping the last known addresses", entry=name)
        self._stale = stale
        if entries or bans:
            self.after_change("sweep")

    def heartbeat(self) -> None:
        safemode.record_boot(self.core, safemode.boot_id(), safemode.uptime(), utcnow())

    def _drift_core(self) -> Core:
        """A core of the drift check's own (store connection and nft context), used only on
        the drift worker thread: listing a table with 100,000 set elements takes nft a
        large fraction of a second, which must not stall the guard on the loop."""
        if self._dcore is None:
            self._dcore = Core(self.config, store=Store(self.config.store_path), protect=[])
        self._dcore.config = self.config
        return self._dcore

    async def drift_tick(self) -> None:
        if self.disabled():
            return
        self._checks += 1
        loop = asyncio.get_running_loop()
        elements = self._checks >= self._next_element_check
        t0 = time.perf_counter()
        report = await loop.run_in_executor(self._drift_pool, lambda: drift.check(self._drift_core(),
                                                                                  elements=elements))
        took = time.perf_counter() - t0
        if elements:
            # every ELEMENT_CHECK_EVERY checks, but never more than ~3 % of the time
            self._next_element_check = self._checks + max(ELEMENT_CHECK_EVERY,
                                                          int(30 * took / self._drift_interval) + 1)
        self.last_check = time.time()
        if report.stale_config and not self._stale_warned:
            self._stale_warned = True
            log.warning("event=config_differs reason=the rules in force were applied from a config tm4d has"
                        " not loaded; send SIGHUP (`systemctl reload tm4d`)")
        if not report:
            return
        # Our own writes may have landed between the store read and the kernel listing:
        # look again before calling it drift.
        report = await loop.run_in_executor(self._drift_pool, lambda: drift.check(self._drift_core(),
                                                                                  elements=elements))
        if not report or self.disabled():
            return
        found = report.summary()
        log.warning("event=drift_found table=inet/tm4 found=%r", found)
        ok = self.apply_all("drift repair")
        self.drift_repairs += ok
        self.last_drift = {"time": format_time(utcnow()), "found": found, "repaired": ok,
                           "ms": round((time.perf_counter() - t0) * 1000, 1)}
        self.core.audit("drift-repair" if ok else "drift", "inet tm4", Origin.ADMIN, "tm4d", found=found,
                        repaired=ok)
        notify.alert("drift_repaired" if ok else "drift_unrepaired", f"table inet tm4 changed from outside: "
                     f"{found}; " + ("restored" if ok else "restore FAILED, retrying"), found=found)
        if ok:
            self.detect_neighbours()

    def watch_audit(self) -> None:
        """Alerts for what other ways in did: repeat offenders, dial-in lock-outs."""
        recs = [r for r in self.core.store.audit_log(200) if r.id > self._audit_seen]
        if any(r.action in WHITELIST_ACTIONS for r in recs):
            self.after_change("audit")  # a change made outside the socket (FastAGI, guard, CLI)
        for r in recs:
            self._audit_seen = max(self._audit_seen, r.id)
            offences = r.detail.get("offences")
            if r.action == "block" and isinstance(offences, int) and offences >= 2:
                notify.alert("repeat_offender", f"{r.subject} banned again (offence {offences}): "
                             f"{r.detail.get('reason', '')}", address=r.subject, offences=offences,
                             expires=r.detail.get("expires"))
            elif "lockout" in r.action:
                notify.alert("dialin_lockout", f"dial-in lock-out: {r.subject} ({r.action})",
                             subject=r.subject, detail=r.detail)

    def after_change(self, why: str) -> None:
        """The whitelist changed: wake the Asterisk ACL sync (never blocks the caller)."""
        self._acl_why = why
        self._acl_wake.set()

    async def acl_worker(self) -> None:
        """Keep Asterisk's ACL in step with the whitelist (when tm4.asterisk.acl is installed).
        Changes are coalesced; a pending reload is retried every ACL_RETRY seconds."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acl_wake.wait(), ACL_RETRY)
            self._acl_wake.clear()
            try:
                acl = importlib.import_module("tm4.asterisk.acl")
            except Exception as exc:
                self.acl_state = f"missing: {exc}"
                continue
            sync = getattr(acl, "sync_acl_async", None)
            if sync is None:
                self.acl_state = "missing: tm4.asterisk.acl has no sync_acl_async"
                continue
            try:
                res = await sync(self.core)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.acl_state = f"failed: {exc!r}"
                log.error("event=acl_sync_failed why=%s reason=%r", self._acl_why, exc)
                continue
            self.acl_state = "ok" if not getattr(res, "error", "") else f"pending: {res.error}"
            if getattr(res, "changed", False) or getattr(res, "reloaded", False):
                log.info("event=acl_synced why=%s changed=%s reloaded=%s", self._acl_why,
                         getattr(res, "changed", None), getattr(res, "reloaded", None))

    # -- reload ----------------------------------------------------------------
    async def reload(self) -> dict[str, Any]:
        """SIGHUP: read the config again; on any error keep running with the old one."""
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            self.last_reload_error = str(exc)
            log.error("event=reload_failed reason=%r action=keeping the running configuration", str(exc))
            notify.alert("config_error", f"config not reloaded, running configuration kept: {exc}")
            return {"reloaded": False, "error": str(exc)}
        old = self.config
        fixed = [k for k in ("state_dir",) if getattr(new, k) != getattr(old, k)]
        fixed += [f"firewall.{k}" for k in ("backend", "netns")
                  if getattr(new.firewall, k) != getattr(old.firewall, k)]
        fixed += [f"daemon.{k}" for k in ("socket", "asterisk_group")
                  if getattr(new.daemon, k) != getattr(old.daemon, k)]
        changed = [f.name for f in fields(Config) if f.name not in ("path", "raw")
                   and getattr(new, f.name) != getattr(old, f.name)]
        self.config = new
        self.core.config = new
        self.notifier.command = list(new.daemon.notify_command)
        self.notifier.timeout = self._seconds(new.daemon.notify_timeout)
        self.reloads += 1
        self.last_reload_error = ""
        self._stale_warned = False
        ok = self.apply_all("reload")
        if new.daemon.drift_interval != old.daemon.drift_interval:
            self._drift_interval = self._seconds(new.daemon.drift_interval)
            self.tasks["drift"].cancel()
            self._spawn("drift", self._every(self._drift_interval, self.drift_tick))
        if new.daemon.sweep_interval != old.daemon.sweep_interval:
            self.tasks["sweeper"].cancel()
            self._spawn("sweeper", self._every(self._seconds(new.daemon.sweep_interval), self.sweep))
        for c in self.components:
            if c.task is None and c.state in ("off", "missing", "pending"):
                self._start_component(c)
            elif set(c.sections) & set(changed) or not c.wanted(new):
                await self._stop_component(c)
                self._start_component(c)
        self.after_change("reload")
        if fixed:
            log.warning("event=reload_partial needs_restart=%s", ",".join(fixed))
        log.info("event=reloaded changed=%s applied=%s", ",".join(changed) or "-", ok)
        return {"reloaded": True, "changed": changed, "applied": ok, "needs_restart": fixed}

    # -- control socket ------------------------------------------------------------
    def dialin_ops(self) -> dict[str, Callable[[Core, dict[str, Any]], Any]]:
        try:
            mod = importlib.import_module("tm4.dialin_ops")
        except Exception as exc:
            log.debug("event=dialin_ops_missing reason=%r", exc)
            return {}
        return dict(getattr(mod, "DIALIN_OPS", {}))

    async def handle(self, peer: Peer, op: str, args: dict[str, Any]) -> Any:
        dialin = self.dialin_ops()
        if peer.role != "root":
            if op not in dialin:
                raise PermissionDenied(f"permission denied: the {self.config.daemon.asterisk_group} group may"
                                       f" only call {', '.join(sorted(dialin)) or 'the dial-in operations'}")
            result = dialin[op](self.core, args)
            self.after_change(op)
            return result
        if op in dialin:
            result = dialin[op](self.core, args)
            self.after_change(op)
            return result
        args = dict(args)
        args["actor"] = peer.actor
        if op in DAEMON_OPS:
            out = DAEMON_OPS[op](self, args)
            return await out if inspect.isawaitable(out) else out
        from .ops import ROOT_OPS

        func = ROOT_OPS.get(op)
        if func is None:
            raise ValidationError(f"unknown operation {op!r}")
        core = self._request_core(args)
        result = func(core, args)
        if op not in READ_ONLY:
            self.after_change(op)
            if self.refresher is not None and op == "allow":
                self.refresher.wake()
        return result

    def _request_core(self, args: dict[str, Any]) -> Core:
        """The daemon's core, with the lock-out guard watching the caller's SSH address."""
        from .model import parse_network

        clients = args.pop("ssh_clients", None)
        if args.get("force"):
            protect = []
        elif isinstance(clients, list) and all(isinstance(c, str) for c in clients):
            protect = [parse_network(c, force=True) for c in clients]
        else:
            protect = []
        return Core(self.config, backend=self.core.backend, store=self.core.store, clock=self.core.clock,
                    protect=protect)

    def status(self) -> dict[str, Any]:
        until = safemode.until(self.core.store)
        return {
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 1),
            "config": str(self.config.path) if self.config.path else None,
            "socket": self.config.daemon.socket,
            "disabled": self.disabled(),
            "safe_mode": {"active": until is not None, "until": format_time(until)},
            "components": {c.name: c.to_json() for c in self.components},
            "drift": {"repairs": self.drift_repairs, "last": self.last_drift,
                      "last_check": self.last_check, "interval": self.config.daemon.drift_interval},
            "other_firewalls": [n.to_json() for n in self.neighbours],
            "asterisk_acl": self.acl_state,
            "guard": self.guard_stats,
            "reloads": self.reloads,
            "last_reload_error": self.last_reload_error or None,
            "control": {"served": self.server.served if self.server else 0,
                        "refused": self.server.refused if self.server else 0},
            "alerts": self.notifier.sent[-5:],
        }

    # -- shutdown ----------------------------------------------------------------
    async def stop(self) -> None:
        """Leave the rules in force: stopping tm4d never opens the firewall."""
        self.stopping.set()
        for c in self.components:
            await self._stop_component(c)
        for t in self.tasks.values():
            t.cancel()
        for t in list(self.tasks.values()):
            with contextlib.suppress(BaseException):
                await t
        if self.server is not None:
            await self.server.close()
        self._drift_pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Tm4Error):
            self.heartbeat()
        await self.notifier.drain()
        notify.install(None)
        log.info("event=stopped rules=left in force")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(f"reload-{time.monotonic()}",
                                                                   self._reload_task()))
        try:
            await self.start()
            await stop.wait()
        finally:
            sd_notify("STOPPING=1")
            await self.stop()
        return 0

    async def _reload_task(self) -> None:
        await self.reload()


# -- daemon-level operations (root only) -----------------------------------------

def _op_status(d: Daemon, a: dict[str, Any]) -> Any:
    return d.status()


def _op_ping(d: Daemon, a: dict[str, Any]) -> Any:
    return {"pong": True, "pid": os.getpid()}


async def _op_reload(d: Daemon, a: dict[str, Any]) -> Any:
    return await d.reload()


async def _op_apply(d: Daemon, a: dict[str, Any]) -> Any:
    """`tm4 apply` while tm4d runs: the admin edited the config and wants it in force, so
    the config is read again first (a broken file is refused; the running one stays)."""
    if d.disabled():
        raise ConflictError("tm4 is disabled: `tm4 enable` loads the rules again")
    res = await d.reload()
    if not res["reloaded"]:
        raise ConfigError(f"not applied, the config is broken (the running one stays): {res['error']}")
    if not res["applied"]:
        raise ApplyError("the kernel refused the rule set; the previous one stays in force (see tm4d's log)")
    return {"applied": True, "last_apply": d.core.store.get_meta("last_apply"),
            "changed": res["changed"], "needs_restart": res["needs_restart"]}


async def _op_drift_check(d: Daemon, a: dict[str, Any]) -> Any:
    loop = asyncio.get_running_loop()
    report = await loop.run_in_executor(d._drift_pool, lambda: drift.check(d._drift_core()))
    return {"drift": bool(report), "found": report.summary()}


DAEMON_OPS: dict[str, Callable[[Daemon, dict[str, Any]], Any]] = {
    "status": _op_status,
    "ping": _op_ping,
    "reload": _op_reload,
    "apply": _op_apply,
    "drift_check": _op_drift_check,
}
WHITELIST_ACTIONS = {"allow", "replace", "revoke", "expire", "resolve"}
READ_ONLY = {"entries", "entry", "bans", "log", "safe_mode", "status", "ping", "drift_check"}


def boot_apply(config: Config) -> int:
    """tm4-boot.service: before the network, load the stored rule set (safe mode decided
    first). Never needs DNS or Asterisk."""
    core = Core(config)
    if core.store.get_meta(DISABLED_KEY) is not None:
        log.warning("event=boot_apply_skipped reason=disabled")
        return 0
    d = safemode.evaluate(core)
    try:
        core.apply()
    except ApplyError as exc:
        log.error("event=boot_apply_failed reason=%s", exc)
        return 1
    log.info("event=boot_applied safe_mode=%s entries=%d bans=%d", d.active, len(core.entries()),
             len(core.bans()))
    return 0


def status_extra(core: Core) -> dict[str, str]:
    """Lines for `tm4 status`: safe mode, tm4d, other firewalls."""
    from .control import daemon_running

    out: dict[str, str] = {}
    until = safemode.until(core.store)
    out["safe mode"] = f"ON until {format_time(until)} (ssh open to all; `tm4 safe-mode off`)" if until else "off"
    out["tm4d"] = "running" if daemon_running(core.config.daemon.socket) else "not running"
    if core.store.get_meta(DISABLED_KEY):
        out["firewall"] = f"DISABLED since {core.store.get_meta(DISABLED_KEY)} (`tm4 enable`)"
    runner = getattr(core.backend, "runner", None)
    if runner is not None:
        out["other firewalls"] = coexist.summary(coexist.detect(runner))
    return out


# -- process plumbing -------------------------------------------------------------

def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) how we are; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), path)


def setup_logging(verbose: bool = False) -> None:
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if journal else \
        "%(asctime)s.%(msecs)03d tm4d[%(process)d] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt,
                        datefmt="%Y-%m-%dT%H:%M:%S", stream=sys.stderr, force=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tm4d", description="tm4 daemon: owns the kernel rules")
    p.add_argument("--config", default=None, help="config file (default $TM4_CONFIG or /etc/tm4/tm4.toml)")
    p.add_argument("--boot", action="store_true", help="load the stored rule set once and exit (tm4-boot)")
    p.add_argument("--check-config", action="store_true", help="read the config, report, exit")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    setup_logging(a.verbose)
    if os.geteuid() != 0 and not a.check_config:
        log.error("event=not_root reason=tm4d must run as root (it owns the kernel rules)")
        return 2
    try:
        config = load_config(a.config)
        if a.check_config:
            print(f"tm4d: config {config.path} is valid")
            return 0
        if a.boot:
            return boot_apply(config)
        daemon = Daemon(a.config, config=config)
        daemon.lock()
        return asyncio.run(daemon.run())
    except Tm4Error as exc:
        log.error("event=fatal reason=%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Daemon", "Component", "boot_apply", "status_extra", "main"]
