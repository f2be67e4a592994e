"""The control socket: JSON lines, peer credentials, and who may do what."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need_root_tools
from daemon_support import Tm4d
from netlab import Lab

from tm4.core.errors import NotFoundError, ValidationError
from tm4.ops import control
from tm4.ops.control import ControlServer, Peer

# -- the protocol, in-process --------------------------------------------------------


class _Server:
    """A ControlServer on its own loop thread, with a handler that echoes."""

    def __init__(self, path: Path, handler: Any, group: str = "tm4test-none"):
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(path, handler, group)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _handler(peer: Peer, op: str, args: dict[str, Any]) -> Any:
    if op == "echo":
        return {"args": args, "uid": peer.uid, "role": peer.role}
    if op == "missing":
        raise NotFoundError("no such thing")
    if op == "boom":
        raise RuntimeError("bug")
    raise ValidationError(f"unknown operation {op!r}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "s.sock"
    if len(str(path)) > 100:
        pytest.skip("tmp path too long for AF_UNIX")
    s = _Server(path, _handler)
    try:
        yield path
    finally:
        s.close()


def raw(path: Path, data: bytes) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_request_reply_shape_and_typed_errors(server: Path) -> None:
    assert control.request(server, "echo", {"a": [1, "x"]}) == {"args": {"a": [1, "x"]}, "uid": os.getuid(),
                                                                 "role": "root"}
    with pytest.raises(NotFoundError, match="no such thing"):
        control.request(server, "missing")
    with pytest.raises(ValidationError, match="unknown operation"):
        control.request(server, "nope")
    with pytest.raises(control.Tm4Error, match="internal error in boom"):
        control.request(server, "boom")
    # the exact wire shape others rely on
    assert raw(server, b'{"op": "echo", "args": {}}\n') == [
        {"ok": True, "result": {"args": {}, "uid": 0, "role": "root"}}]
    assert raw(server, b'{"op": "missing"}\n') == [
        {"ok": False, "type": "NotFoundError", "error": "no such thing"}]


def test_garbage_is_answered_not_fatal(server: Path) -> None:
    replies = raw(server, b'not json\n[1,2]\n{"op": 5}\n{"op": "echo", "args": []}\n\n{"op": "echo"}\n')
    assert [r["ok"] for r in replies] == [False, False, False, False, True]
    assert "not JSON" in replies[0]["error"]
    # a pickle is just bytes that are not JSON
    import pickle

    assert raw(server, pickle.dumps({"op": "echo"}) + b"\n")[0]["ok"] is False
    # an over-long line is refused and the connection closed; the server lives on
    assert raw(server, b"x" * (control.MAX_LINE + 10) + b"\n")[0]["error"] == "request too long"
    assert control.request(server, "echo")["role"] == "root"


def test_many_requests_on_one_connection(server: Path) -> None:
    with control.Client(server) as c:
        for i in range(50):
            assert c.call("echo", {"i": i})["args"] == {"i": i}


def test_daemon_not_running_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(control.DaemonNotRunning):
        control.request(tmp_path / "none.sock", "echo")
    assert not control.daemon_running(tmp_path / "none.sock")
    # a stale socket file (a killed tm4d) does not count as running
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    assert stale.exists() and not control.daemon_running(stale)


def test_second_server_on_a_live_socket_is_refused(server: Path) -> None:
    other = ControlServer(server, _handler)
    with pytest.raises(control.ConflictError):
        asyncio.run(other.start())
    assert control.request(server, "echo")["role"] == "root"


# -- who may do what: real users, real tm4d ----------------------------------------------


class Users:
    """Throw-away users and a group (names prefixed tm4test), removed afterwards."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.group = f"tm4test-ast{tag}"
        self.other = f"tm4test-o{tag}"
        self.member = f"tm4test-m{tag}"
        subprocess.run(["groupadd", self.group], check=True)
        for u in (self.other, self.member):
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", u], check=True)
        subprocess.run(["usermod", "-a", "-G", self.group, self.member], check=True)
        import grp

        self.gid = grp.getgrnam(self.group).gr_gid

    def close(self) -> None:
        for u in (self.other, self.member):
            subprocess.run(["userdel", u], check=False, capture_output=True)
        subprocess.run(["groupdel", self.group], check=False, capture_output=True)


@pytest.fixture
def users() -> Iterator[Users]:
    need_root_tools("useradd", "groupadd")
    u = Users()
    try:
        yield u
    finally:
        u.close()


def as_user(user: str, path: Path, op: str, args: dict[str, Any] | None = None,
            primary_gid: int | None = None) -> dict[str, Any]:
    """Connect as `user` (a forked child that dropped root) and report what happened."""
    pw = pwd.getpwnam(user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        try:
            os.close(r)
            gid = primary_gid if primary_gid is not None else pw.pw_gid
            os.setgroups(os.getgrouplist(user, pw.pw_gid))
            os.setgid(gid)
            os.setuid(pw.pw_uid)
            try:
                out = {"result": control.request(path, op, args or {}, timeout=20)}
            except control.Tm4Error as exc:
                out = {"error": type(exc).__name__, "message": str(exc)}
            os.write(w, json.dumps(out, default=str).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def tm4d(lab: Lab, tmp_path: Path, users: Users) -> Iterator[Tm4d]:
    os.chmod(tmp_path, 0o755)
    d = Tm4d(tmp_path, lab.pbx.ns, group=users.group)
    d.write_config('[dialin]\nexternal_address = "192.0.2.1"\n')
    d.start()
    try:
        yield d
    finally:
        d.close()


def test_socket_file_is_root_and_asterisk_group_only(tm4d: Tm4d, users: Users) -> None:
    st = tm4d.socket.stat()
    assert oct(st.st_mode & 0o777) == "0o660"
    assert (st.st_uid, st.st_gid) == (0, users.gid)
    got = as_user(users.other, tm4d.socket, "entries")
    assert got["error"] == "PermissionDenied", got


def test_peer_credentials_refuse_others_even_on_an_open_socket(tm4d: Tm4d, users: Users) -> None:
    os.chmod(tm4d.socket, 0o666)  # a mistake by an admin: the kernel's word still decides
    for op, args in (("entries", {}), ("allow", {"name": "x", "sources": ["192.0.2.9"], "services": ["ssh"]}),
                     ("dialin.external_address", {})):
        got = as_user(users.other, tm4d.socket, op, args)
        assert got["error"] == "PermissionDenied", (op, got)
        assert "neither root nor in group" in got["message"]
    assert tm4d.core().entries() == []
    assert tm4d.call("status")["control"]["refused"] == 3


def test_asterisk_group_may_only_dial_in(tm4d: Tm4d, users: Users) -> None:
    from tm4.dialin.ops import DIALIN_OPS

    forbidden = [
        ("allow", {"name": "evil", "sources": ["0.0.0.0/0"], "services": ["all"], "force": True}),
        ("block", {"address": "192.0.2.1"}),
        ("revoke", {"name": "x"}), ("apply", {}), ("disable", {}), ("entries", {}), ("status", {}),
        ("reload", {}), ("safe_mode_off", {}), ("log", {}),
    ]
    for who, gid in ((users.member, None), (users.other, users.gid)):  # supplementary / primary group
        for op, args in forbidden:
            got = as_user(who, tm4d.socket, op, args, primary_gid=gid)
            assert got.get("error") == "PermissionDenied", (who, op, got)
            assert "may only call" in got["message"]
        ext = as_user(who, tm4d.socket, "dialin.external_address", primary_gid=gid)
        assert ext == {"result": {"address": "192.0.2.1", "source": ext["result"]["source"]}}, ext
        # a grant needs a token that only a right passcode yields: no way to add an entry
        got = as_user(who, tm4d.socket, "dialin.grant",
                      {"token": "forged.token", "address": "198.51.100.99", "callerid": "100"}, primary_gid=gid)
        assert got.get("error") == "ValidationError", got
    assert set(DIALIN_OPS) >= {"dialin.verify", "dialin.grant", "dialin.external_address"}
    assert tm4d.core().entries() == []
    # root may call all of it
    assert tm4d.call("dialin.external_address")["address"] == "192.0.2.1"
    tm4d.call("allow", name="ok", sources=["192.0.2.9"], services=["ssh"])
    assert [e.name for e in tm4d.core().entries()] == ["ok"]
    assert "control_refused" in tm4d.log()

