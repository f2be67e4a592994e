"""How a call reaches the dial-in operations: over tm4d's control socket, or in-process.

Both give the conversation the same typed replies (Session, Checked, Granted,
Found); a failure to reach them is a Tm4Error, which the transport turns into
the "unavailable" prompt.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tm4.core.errors import Tm4Error
from tm4.dialin.call import CallInfo, Checked, Found, Granted, Session

if TYPE_CHECKING:
    from tm4.ops.engine import Core

DEFAULT_SOCKET = "/run/tm4/tm4.sock"
Call = Callable[[str, dict[str, Any]], Any]


class Backend(Protocol):
    def verify(self, passcode: str, call: CallInfo) -> Session: ...

    def check_address(self, token: str, address: str) -> Checked: ...

    def grant(self, token: str, address: str, callerid: str) -> Granted: ...

    def external_address(self) -> Found: ...


class OpsBackend:
    """The dial-in operations through one `call(op, args)` function."""

    def __init__(self, call: Call, name: str):
        self.call = call
        self.name = name

    def _obj(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        result = self.call(op, args)
        if not isinstance(result, dict):
            raise Tm4Error(f"{op} answered {type(result).__name__}, not an object")
        return result

    def verify(self, passcode: str, call: CallInfo) -> Session:
        r = self._obj("dialin.verify", {
            "passcode": passcode, "callerid": call.callerid, "channel_type": call.channel_type,
            "endpoint": call.endpoint, "remote_addr": call.remote_addr,
        })
        return Session(ok=bool(r.get("ok")), token=str(r.get("token") or ""),
                       delay=float(r.get("delay") or 0.0), own_address=str(r.get("own_address") or ""),
                       reason=str(r.get("reason") or ""), tts=str(r.get("tts") or ""),
                       tts_cache=str(r.get("tts_cache") or ""))

    def check_address(self, token: str, address: str) -> Checked:
        r = self._obj("dialin.check_address", {"token": token, "address": address})
        return Checked(ok=bool(r.get("ok")), reason=str(r.get("reason") or ""))

    def grant(self, token: str, address: str, callerid: str) -> Granted:
        r = self._obj("dialin.grant", {"token": token, "address": address, "callerid": callerid})
        entry = r.get("entry") or {}
        return Granted(name=str(entry.get("name", "")), address=address)

    def external_address(self) -> Found:
        r = self._obj("dialin.external_address", {})
        return Found(address=str(r.get("address") or ""))


def local_backend(core: Core) -> OpsBackend:
    from tm4.dialin.ops import DIALIN_OPS

    def call(op: str, args: dict[str, Any]) -> Any:
        return DIALIN_OPS[op](core, args)

    return OpsBackend(call, "local")


def socket_backend(path: str | Path, timeout: float = 20.0) -> OpsBackend:
    from tm4.ops.control import request

    def call(op: str, args: dict[str, Any]) -> Any:
        return request(path, op, args, timeout=timeout)

    return OpsBackend(call, f"socket:{path}")


def connect(socket_path: str = "") -> OpsBackend:
    """tm4d when it answers; else, for root only, the core in this process (the fallback).

    The socket path comes from the AGI argument, else TM4_SOCKET, else (root
    only, who may read tm4.toml) the config, else /run/tm4/tm4.sock.
    """
    from tm4.ops.control import DaemonNotRunning, daemon_running

    config = None
    path = socket_path or os.environ.get("TM4_SOCKET", "")
    if not path and os.geteuid() == 0:
        from tm4.core.config import load_config

        config = load_config()
        path = config.daemon.socket
    path = path or DEFAULT_SOCKET
    if daemon_running(path):
        return socket_backend(path)
    if os.geteuid() != 0:
        raise DaemonNotRunning(f"tm4d does not answer on {path}")
    from tm4.core.config import load_config
    from tm4.ops.engine import Core

    return local_backend(Core(config or load_config()))


class LazyBackend:
    """Connects on first use, so the AGI answers the call before importing the core."""

    def __init__(self, factory: Callable[[], Backend]):
        self._factory = factory
        self._backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = self._factory()
        return self._backend

    def verify(self, passcode: str, call: CallInfo) -> Session:
        return self.backend.verify(passcode, call)

    def check_address(self, token: str, address: str) -> Checked:
        return self.backend.check_address(token, address)

    def grant(self, token: str, address: str, callerid: str) -> Granted:
        return self.backend.grant(token, address, callerid)

    def external_address(self) -> Found:
        return self.backend.external_address()
