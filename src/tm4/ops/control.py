"""tm4d's control socket: JSON lines over a Unix socket, never pickle.

Request:  {"op": "allow", "args": {...}}                      one line, UTF-8 JSON
Reply:    {"ok": true, "result": ...}  or  {"ok": false, "error": "...", "type": "ValidationError"}

A request is at most MAX_LINE bytes, nested at most MAX_DEPTH deep and has exactly the
shape of `Request`; anything else is answered with a ValidationError before any
operation sees it (each operation's arguments are checked by tm4.ops.requests).

Who may do what is decided from the kernel's word, not the client's: SO_PEERCRED
gives the peer's uid/gid, SO_PEERGROUPS its supplementary groups. root (uid 0)
may call every operation; members of the Asterisk group only the dial-in
operations (`tm4.dialin.ops.DIALIN_OPS`); everyone else is refused. The socket
file itself is 0660 root:<asterisk group>, so others cannot even connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec

from tm4.core import errors
from tm4.core.errors import ConflictError, Tm4Error, ValidationError

log = logging.getLogger("tm4.control")

MAX_LINE = 1 << 20
MAX_DEPTH = 32  # real requests nest 3 deep (args -> list -> string)
IDLE_TIMEOUT = 60.0
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


class DaemonNotRunning(Tm4Error):
    """Nothing answers on the control socket."""


class PermissionDenied(Tm4Error):
    """The control socket refused this user or this operation."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]
    role: str  # "root", "dialin" or "none"

    @property
    def actor(self) -> str:
        try:
            name = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            name = "?"
        return f"uid={self.uid}({name}) pid={self.pid} via=socket"


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def peer_of(sock: socket.socket, dialin_gid: int | None) -> Peer:
    """The connecting process's credentials, as the kernel recorded them at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] = ()
    try:
        graw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
        groups = struct.unpack(f"{len(graw) // 4}I", graw[: len(graw) // 4 * 4])
    except OSError:  # old kernel: the user's configured groups instead
        with contextlib.suppress(KeyError, OSError):
            pw = pwd.getpwuid(uid)
            groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    if uid == 0:
        role = "root"
    elif dialin_gid is not None and (gid == dialin_gid or dialin_gid in groups):
        role = "dialin"
    else:
        role = "none"
    return Peer(pid, uid, gid, tuple(groups), role)


class Request(msgspec.Struct, forbid_unknown_fields=True):
    op: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    args: dict[str, Any] = {}


_SHAPE = 'a request is {"op": "...", "args": {...}}'


def nesting_depth(value: Any, limit: int) -> int:
    """How deep lists and objects nest in `value`, counted up to limit + 1 (no recursion)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_request(line: bytes) -> Request:
    """One request line, checked for shape, size and depth; ValidationError says what is wrong."""
    if len(line) > MAX_LINE:
        raise ValidationError("request too long")
    try:
        req = msgspec.json.decode(line, type=Request)
    except RecursionError:  # msgspec stops at Python's recursion limit
        raise ValidationError(f"request nested deeper than {MAX_DEPTH} levels") from None
    except msgspec.ValidationError as exc:
        raise ValidationError(f"{_SHAPE}: {exc}") from None
    except msgspec.DecodeError:
        raise ValidationError("request is not JSON") from None
    if nesting_depth(req.args, MAX_DEPTH - 1) > MAX_DEPTH - 1:
        raise ValidationError(f"request nested deeper than {MAX_DEPTH} levels")
    return req


# Handler: (peer, op, args) -> result (sync value or awaitable). Raise Tm4Error to refuse.
Handler = Callable[[Peer, str, dict[str, Any]], Any]


class ControlServer:
    def __init__(self, path: str | Path, handler: Handler, group: str = "asterisk"):
        self.path = Path(path)
        self.handler = handler
        self.group = group
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.served = 0
        self.refused = 0

    async def start(self) -> None:
        if not self.path.parent.exists():  # an existing directory (/run/tm4 from systemd) is left as it is
            self.path.parent.mkdir(parents=True, mode=0o755)
            os.chmod(self.path.parent, 0o755)
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise ConflictError(f"another tm4d answers on {self.path}")
            self.path.unlink()
        gid = group_id(self.group)
        # Bind under a umask so no client can connect before the mode is set.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_LINE)
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(self.path, 0, gid)
            os.chmod(self.path, 0o660)
        else:
            log.warning("event=no_dialin_group group=%s reason=group does not exist; socket is root-only",
                        self.group)
        log.info("event=control_listening path=%s group=%s", self.path, self.group if gid is not None else "-")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._clients):
                t.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event=control_client_failed")
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = peer_of(sock, group_id(self.group))
        if peer.role == "none":
            self.refused += 1
            log.warning("event=control_refused uid=%s gid=%s pid=%s reason=neither root nor in group %s",
                        peer.uid, peer.gid, peer.pid, self.group)
            # Read (and ignore) the first request, so the refusal is its answer, then hang up.
            with contextlib.suppress(ValueError, TimeoutError):
                await asyncio.wait_for(reader.readline(), 5.0)
            await _send(writer, {"ok": False, "type": "PermissionDenied",
                                 "error": f"permission denied: uid {peer.uid} is neither root nor in group "
                                          f"{self.group}"})
            return
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
            except ValueError:  # longer than MAX_LINE
                await _send(writer, {"ok": False, "type": "ValidationError", "error": "request too long"})
                return
            if not line:
                return
            if not line.strip():
                continue
            reply = await self._answer(peer, line)
            await _send(writer, reply)

    async def _answer(self, peer: Peer, line: bytes) -> dict[str, Any]:
        try:
            req = parse_request(line)
        except ValidationError as exc:
            return {"ok": False, "type": "ValidationError", "error": str(exc)}
        op, args = req.op, req.args
        try:
            result = self.handler(peer, op, args)
            if isinstance(result, Awaitable):
                result = await result
        except Tm4Error as exc:
            if isinstance(exc, PermissionDenied):
                self.refused += 1
                log.warning("event=control_refused uid=%s op=%s reason=%s", peer.uid, op, exc)
            return {"ok": False, "type": type(exc).__name__, "error": str(exc)}
        except Exception as exc:
            log.exception("event=control_op_failed op=%s uid=%s", op, peer.uid)
            return {"ok": False, "type": "Tm4Error", "error": f"internal error in {op}: {exc}"}
        self.served += 1
        return {"ok": True, "result": result}


async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, default=str).encode() + b"\n")
    await writer.drain()


# -- client ----------------------------------------------------------------------

def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def daemon_running(path: str | Path) -> bool:
    """Does a tm4d answer on this socket? (A leftover socket file does not count.)"""
    p = Path(path)
    if not p.exists():
        return False
    try:
        return _answers(p)
    except PermissionError:
        return True  # it is there, we just may not talk to it


def _error(reply: dict[str, Any]) -> Tm4Error:
    name = str(reply.get("type") or "Tm4Error")
    msg = str(reply.get("error") or "tm4d refused the request")
    cls = {"DaemonNotRunning": DaemonNotRunning, "PermissionDenied": PermissionDenied}.get(name)
    if cls is None:
        found = getattr(errors, name, None)
        cls = found if isinstance(found, type) and issubclass(found, Tm4Error) else Tm4Error
    return cls(msg)


class Client:
    """A connection to tm4d; several requests may use one connection."""

    def __init__(self, path: str | Path, timeout: float = 30.0):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise DaemonNotRunning(f"tm4d is not running (no answer on {self.path})") from None
        except PermissionError:
            self.sock.close()
            raise PermissionDenied(f"permission denied on {self.path}: only root and the Asterisk group"
                                   " may use tm4d's socket") from None
        except OSError as exc:
            self.sock.close()
            raise DaemonNotRunning(f"cannot reach tm4d on {self.path}: {exc.strerror or exc}") from None
        self._buf = self.sock.makefile("rb")

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        line = json.dumps({"op": op, "args": args or {}}).encode() + b"\n"
        try:
            # BrokenPipe: the daemon hung up after answering (a refusal): read that answer
            with contextlib.suppress(BrokenPipeError):
                self.sock.sendall(line)
            raw = self._buf.readline(MAX_LINE + 1)
        except TimeoutError:
            raise Tm4Error(f"tm4d did not answer {op!r} in time") from None
        except OSError as exc:
            raise DaemonNotRunning(f"tm4d closed the connection: {exc.strerror or exc}") from None
        if not raw:
            raise DaemonNotRunning("tm4d closed the connection without an answer")
        try:
            reply = json.loads(raw)
        except ValueError:
            raise Tm4Error("tm4d sent something that is not JSON") from None
        if not isinstance(reply, dict):
            raise Tm4Error("tm4d sent an unexpected reply")
        if reply.get("ok") is True:
            return reply.get("result")
        raise _error(reply)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._buf.close()
            self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(path: str | Path, op: str, args: dict[str, Any] | None = None, *, timeout: float = 30.0) -> Any:
    """One request to tm4d. Raises DaemonNotRunning, PermissionDenied or the typed Tm4Error
    the operation raised in the daemon (ValidationError, NotFoundError, ...)."""
    with Client(path, timeout) as c:
        return c.call(op, args)


def invoke(socket_path: str | Path, op: str, args: dict[str, Any] | None,
           local: Callable[[str, dict[str, Any]], Any]) -> Any:
    """What the CLI calls: through tm4d when it runs, else directly (root's fallback).

    `local(op, args)` runs the operation in this process for the fallback (called only
    when needed). The lock-out
    guard needs the admin's SSH address, which tm4d cannot see: it is sent along.
    """
    from tm4.ops.lockout import ssh_client_addresses

    args = dict(args or {})
    if daemon_running(socket_path):
        if "ssh_clients" not in args and not args.get("force"):
            args["ssh_clients"] = ssh_client_addresses()
        return request(socket_path, op, args)
    if os.geteuid() != 0:
        raise DaemonNotRunning(f"tm4d is not running (no answer on {socket_path}) and only root may act directly")
    args.pop("ssh_clients", None)
    return local(op, args)
