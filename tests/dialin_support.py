"""Shared pieces of the dial-in tests: a core without a kernel, passcodes, a fake tm4d."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fakes import MemoryKernel

from tm4.core.config import parse_config
from tm4.core.model import utcnow
from tm4.dialin.ops import passcode_book
from tm4.ops.engine import Core


class Clock:
    def __init__(self, start: datetime | None = None):
        self.now = start or datetime(2026, 11, 21, 6, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


NO_NS = "tm4-test-no-such-netns"  # kernel and interface look-ups find nothing there


def config_data(tmp: Path, dialin: dict[str, Any] | None = None, netns: str = "") -> dict[str, Any]:
    return {
        "state_dir": str(tmp / "state"),
        "dialin": {"discover": [], "external_address": "198.51.100.1", **(dialin or {})},
        "firewall": {"netns": netns or NO_NS},
        "daemon": {"socket": str(tmp / "no-tm4d.sock")},
    }


def write_config(tmp: Path, dialin: dict[str, Any] | None = None, netns: str = "") -> Path:
    """The same settings as a tm4.toml, for a classic AGI child running as root."""
    def val(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return str(v).lower() if isinstance(v, bool) else str(v)

    data = config_data(tmp, dialin, netns)
    lines = [f"state_dir = {val(data.pop('state_dir'))}"]
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {val(v)}" for k, v in table.items()]
    path = tmp / "tm4.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_core(tmp: Path, dialin: dict[str, Any] | None = None, *, netns: str = "",
              clock: Clock | None = None) -> Core:
    """A core on its own store; in a lab namespace (real nft) or with a recording backend."""
    cfg = parse_config(config_data(tmp, dialin, netns))
    if netns:
        return Core(cfg, protect=[], clock=clock or utcnow)
    return Core(cfg, backend=MemoryKernel(), protect=[], clock=clock or Clock())


def add_passcode(core: Core, owner: str, code: str, **kw: Any) -> str:
    return passcode_book(core).add(owner, code, **kw)


def entry_addresses(core: Core, name: str) -> list[str]:
    e = core.store.get_entry(name)
    return [] if e is None else [s.text for s in e.sources]


class FakeTm4d:
    """tm4d's control socket serving only the dial-in operations (tm4.ops.control.ControlServer)."""

    def __init__(self, core: Core, path: Path):
        self.core = core
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Any = None
        self.calls: list[str] = []

    def handler(self, peer: Any, op: str, args: dict[str, Any]) -> Any:
        from tm4.dialin.ops import DIALIN_OPS
        from tm4.ops.control import PermissionDenied

        self.calls.append(op)
        if op not in DIALIN_OPS:
            raise PermissionDenied(f"{op} is not a dial-in operation")
        return DIALIN_OPS[op](self.core, args)

    def __enter__(self) -> FakeTm4d:
        from tm4.ops.control import ControlServer

        self.thread.start()
        self.server = ControlServer(self.path, self.handler, group="root")
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@contextlib.contextmanager
def fastagi_server(core: Core | None, **kw: Any) -> Iterator[Any]:
    """tm4's FastAGI server on an ephemeral loopback port, in a thread with its own loop."""
    from tm4.dialin.fastagi import start_fastagi

    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    app = asyncio.run_coroutine_threadsafe(start_fastagi(core, "127.0.0.1", 0, **kw), loop).result(10)
    app.port = app.server.sockets[0].getsockname()[1]
    app.loop = loop
    try:
        yield app
    finally:
        asyncio.run_coroutine_threadsafe(app.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
