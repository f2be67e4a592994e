"""tm4d's one asyncio loop: start-up, the hosted tasks, periodic work, shutdown.

Start-up: open the store, re-check bans against the whitelist (the whitelist always
wins), decide safe mode, apply the whole rule set in one transaction, then start the
control socket, the expiry sweeper, the drift repair, the heartbeat, the audit watch,
the Asterisk ACL sync and the components (tm4.daemon.components).

Everything touching the core runs on the loop's thread, one step at a time, so the
store and the kernel are never written by two tasks at once.

Stopping tm4d leaves the rules in force (fail closed). SIGHUP reloads the config
(tm4.daemon.reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import inspect
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any

from tm4.core import notify
from tm4.core.config import Config, load_config
from tm4.core.durations import parse_duration
from tm4.core.errors import ApplyError, ConflictError, StoreError, Tm4Error
from tm4.core.model import Origin, format_time, utcnow
from tm4.daemon.acl import AclFollower
from tm4.daemon.components import Component, default_components
from tm4.daemon.dispatch import handle
from tm4.daemon.reload import reload_config
from tm4.daemon.repair import DriftRepair
from tm4.daemon.systemd import sd_notify
from tm4.firewall import coexist
from tm4.ops import safemode
from tm4.ops.control import ControlServer
from tm4.ops.engine import Core
from tm4.ops.root import DISABLED_KEY

log = logging.getLogger("tm4.daemon")

HEARTBEAT = safemode.HEARTBEAT.total_seconds()
WHITELIST_ACTIONS = {"allow", "replace", "revoke", "expire", "resolve"}


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
                                        self.seconds(self.config.daemon.notify_timeout))
        self.server: ControlServer | None = None
        self.refresher: Any = None
        self.guard: Any = None
        self.fastagi: Any = None
        self.guard_stats: dict[str, Any] = {"bans": 0, "last": None}
        self.started = time.time()
        self.stopping = asyncio.Event()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.neighbours: list[coexist.Neighbour] = []
        self.reloads = 0
        self.last_reload_error = ""
        self._stale: set[str] = set()
        self._audit_seen = 0
        self._lock_fh: IO[str] | None = None
        self.drift = DriftRepair(self, self.seconds(self.config.daemon.drift_interval))
        self.acl = AclFollower()

    @staticmethod
    def seconds(text: str) -> float:
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
        except StoreError as exc:  # applied; only the bookkeeping could not be written
            log.error("event=apply_unrecorded why=%s reason=%s", reason, exc)
            return True
        n = sum(len(s.elements) for s in rs.sets.values())
        log.info("event=applied why=%s sets=%d elements=%d rules=%d ms=%.1f", reason, len(rs.sets), n,
                 len(rs.input_rules), (time.perf_counter() - t0) * 1000)
        return True

    async def start(self) -> None:
        notify.install(self.notifier)
        # Rows that no longer parse are set aside (logged, `tm4 quarantine list`), never fatal:
        # entries here, bans as recheck_bans reads them.
        self.core.entries()
        try:
            lifted = self.recheck_bans()
        except StoreError as exc:  # a full disk: the rules still load
            lifted = []
            log.error("event=bans_recheck_failed reason=%s", exc)
        quarantined = len(self.core.store.quarantined())
        if quarantined:
            log.error("event=store_rows_quarantined count=%d (see `tm4 quarantine list`)", quarantined)
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
        self.server = ControlServer(self.config.daemon.socket, functools.partial(handle, self),
                                    self.config.daemon.asterisk_group)
        await self.server.start()
        for c in self.components:
            c.start(self)
        self.spawn("sweeper", self.every(self.seconds(self.config.daemon.sweep_interval), self.sweep))
        self.spawn("drift", self.every(self.drift.interval, self.drift.drift_tick))
        self.spawn("heartbeat", self.every(HEARTBEAT, self.heartbeat))
        self.spawn("audit", self.every(1.0, self.watch_audit))
        self.spawn("acl", self.acl.run(self.core))
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
    def spawn(self, name: str, coro: Awaitable[None]) -> None:
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

    async def every(self, seconds: float, step: Callable[[], Any]) -> None:
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
        self.acl.wake(why)

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
            "drift": self.drift.to_json(),
            "other_firewalls": [n.to_json() for n in self.neighbours],
            "asterisk_acl": self.acl.state,
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
            await c.stop()
        for t in self.tasks.values():
            t.cancel()
        for t in list(self.tasks.values()):
            with contextlib.suppress(BaseException):
                await t
        if self.server is not None:
            await self.server.close()
        self.drift.close()
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
        loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(f"reload-{time.monotonic()}",
                                                                  self._reload_on_sighup()))
        try:
            await self.start()
            await stop.wait()
        finally:
            sd_notify("STOPPING=1")
            await self.stop()
        return 0

    async def _reload_on_sighup(self) -> None:
        await reload_config(self)
