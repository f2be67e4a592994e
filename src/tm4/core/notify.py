"""Telling the admin: events worth a human go to the journal (tag `tm4-alert`) and to
an optional `notify_command` (an argv that reads one JSON object on stdin).

Any component calls `alert(kind, message, **fields)`; inside tm4d the daemon installs
a Notifier as the sink, elsewhere the alert is only logged. The command runs without
a shell, with a timeout, and its failure is logged, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("tm4.notify")

# The stable tag: `journalctl -t tm4-alert` shows every alert and nothing else.
JOURNAL_TAG = "tm4-alert"
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# Event kinds tm4 raises (add freely; rename never: notify hooks match on them).
KINDS = (
    "repeat_offender",  # a source banned again
    "dns_stale",  # a DNS name stopped resolving / its addresses were dropped
    "dialin_lockout",  # a caller ID or the whole dial-in locked out
    "drift_repaired",  # the kernel table was changed from outside and put back
    "drift_unrepaired",  # ... and putting it back failed (retried every drift check)
    "safe_mode",  # safe mode started or ended
    "config_error",  # SIGHUP with a broken config; the running one is kept
    "component_failed",  # a hosted component crashed (it is restarted)
    "disabled",  # the firewall was opened deliberately (`tm4 disable`)
)


def journal_fields(kind: str, message: str, fields: dict[str, Any], priority: int = 4) -> bytes:
    """One entry in journald's native protocol (binary-safe form for every value)."""
    items: list[tuple[str, str]] = [
        ("MESSAGE", f"{kind}: {message}"),
        ("PRIORITY", str(priority)),
        ("SYSLOG_IDENTIFIER", JOURNAL_TAG),
        ("TM4_EVENT", kind),
    ]
    for k, v in sorted(fields.items()):
        key = "TM4_" + "".join(c if c.isalnum() else "_" for c in k.upper())
        items.append((key, v if isinstance(v, str) else json.dumps(v, default=str)))
    out = bytearray()
    for key, value in items:
        data = value.encode("utf-8", "replace")
        out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
    return bytes(out)


def send_journal(payload: bytes, path: str = JOURNAL_SOCKET) -> bool:
    if not os.path.exists(path):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(payload, path)
        return True
    except OSError as exc:
        log.warning("event=journal_failed path=%s reason=%s", path, exc.strerror or exc)
        return False


class Notifier:
    """Journal + notify_command. `event()` never blocks the event loop and never raises."""

    def __init__(self, command: Sequence[str] = (), timeout: float = 10.0,
                 journal_socket: str = JOURNAL_SOCKET, host: str | None = None):
        self.command = list(command)
        self.timeout = timeout
        self.journal_socket = journal_socket
        self.host = host or socket.gethostname()
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent: list[dict[str, Any]] = []  # recent events, for `tm4 status`

    def payload(self, kind: str, message: str, fields: dict[str, Any]) -> dict[str, Any]:
        return {
            "event": kind,
            "message": message,
            "host": self.host,
            "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            **{k: v for k, v in fields.items() if k not in ("event", "message", "host", "time")},
        }

    def event(self, kind: str, message: str, **fields: Any) -> None:
        data = self.payload(kind, message, fields)
        detail = " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        log.warning("event=alert kind=%s %s msg=%r", kind, detail, message)
        send_journal(journal_fields(kind, message, fields), self.journal_socket)
        self.sent = (self.sent + [data])[-20:]
        if not self.command:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._run_sync(data)
            return
        task = loop.create_task(self._run_async(data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for running notify commands (at shutdown, and in tests)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run_async(self, data: dict[str, Any]) -> None:
        body = (json.dumps(data, default=str) + "\n").encode()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            log.error("event=notify_failed cmd=%s reason=%s", self.command[0], exc.strerror or exc)
            return
        try:
            _, err = await asyncio.wait_for(proc.communicate(body), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            log.error("event=notify_failed cmd=%s reason=timeout after %ss", self.command[0], self.timeout)
            return
        if proc.returncode != 0:
            log.error("event=notify_failed cmd=%s rc=%s stderr=%r", self.command[0], proc.returncode,
                      err.decode(errors="replace").strip()[:200])

    def _run_sync(self, data: dict[str, Any]) -> None:
        try:
            p = subprocess.run(self.command, input=json.dumps(data, default=str) + "\n", text=True,
                               capture_output=True, timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("event=notify_failed cmd=%s reason=%s", self.command[0], exc)
            return
        if p.returncode != 0:
            log.error("event=notify_failed cmd=%s rc=%s stderr=%r", self.command[0], p.returncode,
                      p.stderr.strip()[:200])


_sink: Notifier | None = None


def install(notifier: Notifier | None) -> None:
    """Make `alert()` go to this notifier (tm4d does this at start-up)."""
    global _sink
    _sink = notifier


def alert(kind: str, message: str, **fields: Any) -> None:
    """Raise an event worth a human. Safe to call from any component, in or out of tm4d."""
    if _sink is not None:
        _sink.event(kind, message, **fields)
    else:
        detail = " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        log.warning("event=alert kind=%s %s msg=%r", kind, detail, message)
