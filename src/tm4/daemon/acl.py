"""tm4d keeping Asterisk's ACL in step with the whitelist (when tm4.asterisk.acl is
installed). Changes are coalesced; a pending reload is retried every ACL_RETRY seconds."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging

from tm4.ops.engine import Core

log = logging.getLogger("tm4.daemon")

ACL_RETRY = 30.0


class AclFollower:
    def __init__(self) -> None:
        self.state = "not started"
        self._wake = asyncio.Event()
        self._why = ""

    def wake(self, why: str) -> None:
        """The whitelist changed: sync soon (never blocks the caller)."""
        self._why = why
        self._wake.set()

    async def run(self, core: Core) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), ACL_RETRY)
            self._wake.clear()
            try:
                acl = importlib.import_module("tm4.asterisk.acl")
            except Exception as exc:
                self.state = f"missing: {exc}"
                continue
            sync = getattr(acl, "sync_acl_async", None)
            if sync is None:
                self.state = "missing: tm4.asterisk.acl has no sync_acl_async"
                continue
            try:
                res = await sync(core)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.state = f"failed: {exc!r}"
                log.error("event=acl_sync_failed why=%s reason=%r", self._why, exc)
                continue
            self.state = "ok" if not getattr(res, "error", "") else f"pending: {res.error}"
            if getattr(res, "changed", False) or getattr(res, "reloaded", False):
                log.info("event=acl_synced why=%s changed=%s reloaded=%s", self._why,
                         getattr(res, "changed", None), getattr(res, "reloaded", None))
