"""tm4d's drift repair: every daemon.drift_interval, compare the kernel's table with the
last apply and put back what changed from outside (`nft flush ruleset`, a restarted
nftables service), with an audit record and an alert."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tm4.core import notify
from tm4.core.model import Origin, format_time, utcnow
from tm4.core.store import Store
from tm4.firewall.generation import GenerationReader
from tm4.ops import drift
from tm4.ops.engine import Core

if TYPE_CHECKING:
    from tm4.daemon.host import Daemon

log = logging.getLogger("tm4.daemon")

ELEMENT_CHECK_EVERY = 5  # compare set elements on every 5th drift check (rules on every one)
FULL_CHECK_EVERY = 30  # even with an unchanged generation, look for real every 30th tick


class DriftRepair:
    def __init__(self, daemon: Daemon, interval: float):
        self.daemon = daemon
        self.interval = interval
        self.repairs = 0
        self.last: dict[str, Any] | None = None
        self.last_check: float | None = None
        self.stale_warned = False
        self._checks = 0
        self._next_element_check = ELEMENT_CHECK_EVERY
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tm4-drift")
        self._core: Core | None = None
        self._generations: GenerationReader | None = None
        self._clean_generation: int | None = None  # ruleset generation of the last clean check
        self._skipped = 0
        self.skipped_checks = 0

    def _generation(self) -> int | None:
        """The kernel's ruleset generation (None if it cannot be read: then always check)."""
        try:
            if self._generations is None:
                self._generations = GenerationReader(self.daemon.config.firewall.netns)
            return self._generations.read()
        except OSError:
            return None

    def _check_core(self) -> Core:
        """A core of the drift check's own (store connection and nft context), used only on
        the drift worker thread: listing a table with 100,000 set elements takes nft a
        large fraction of a second, which must not stall the guard on the loop."""
        config = self.daemon.config
        if self._core is None:
            self._core = Core(config, store=Store(config.store_path), protect=[])
        self._core.config = config
        return self._core

    async def check(self, elements: bool = True) -> drift.DriftReport:
        """One look at the kernel, on the drift worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: drift.check(self._check_core(),
                                                                          elements=elements))

    async def drift_tick(self) -> None:
        d = self.daemon
        if d.disabled():
            return
        loop = asyncio.get_running_loop()
        generation = await loop.run_in_executor(self._pool, self._generation)
        if (generation is not None and generation == self._clean_generation
                and self._skipped < FULL_CHECK_EVERY):
            # no transaction committed since the last clean check: nothing can have drifted
            self._skipped += 1
            self.skipped_checks += 1
            self.last_check = time.time()
            return
        self._skipped = 0
        self._checks += 1
        elements = self._checks >= self._next_element_check
        t0 = time.perf_counter()
        report = await self.check(elements)
        took = time.perf_counter() - t0
        if elements:
            # every ELEMENT_CHECK_EVERY checks, but never more than ~3 % of the time
            self._next_element_check = self._checks + max(ELEMENT_CHECK_EVERY,
                                                          int(30 * took / self.interval) + 1)
        self.last_check = time.time()
        if report.stale_config and not self.stale_warned:
            self.stale_warned = True
            log.warning("event=config_differs reason=the rules in force were applied from a config tm4d has"
                        " not loaded; send SIGHUP (`systemctl reload tm4d`)")
        if not report:
            if elements:  # clean in full: until the next commit there is nothing to look at
                self._clean_generation = generation
            return
        self._clean_generation = None
        # Our own writes may have landed between the store read and the kernel listing:
        # look again before calling it drift.
        report = await self.check(elements)
        if not report or d.disabled():
            return
        found = report.summary()
        log.warning("event=drift_found table=inet/tm4 found=%r", found)
        ok = d.apply_all("drift repair")
        self.repairs += ok
        self.last = {"time": format_time(utcnow()), "found": found, "repaired": ok,
                     "ms": round((time.perf_counter() - t0) * 1000, 1)}
        d.core.audit("drift-repair" if ok else "drift", "inet tm4", Origin.ADMIN, "tm4d", found=found,
                     repaired=ok)
        notify.alert("drift_repaired" if ok else "drift_unrepaired", f"table inet tm4 changed from outside: "
                     f"{found}; " + ("restored" if ok else "restore FAILED, retrying"), found=found)
        if ok:
            d.detect_neighbours()

    def to_json(self) -> dict[str, Any]:
        return {"repairs": self.repairs, "last": self.last, "last_check": self.last_check,
                "skipped_checks": self.skipped_checks,
                "interval": self.daemon.config.daemon.drift_interval}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._generations is not None:
            self._generations.close()
