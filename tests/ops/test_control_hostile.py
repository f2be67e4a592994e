"""Hostile control-socket requests: every line gets one typed JSON answer, no operation ever
sees arguments of the wrong shape, and tm4d stays up."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from daemon_support import Tm4d
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netlab import Lab

from tm4.core.errors import ValidationError
from tm4.ops import control
from tm4.ops.requests import SCHEMAS, check_args


class Conn:
    """One raw connection: a line out, a line back."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.buf = self.sock.makefile("rb")

    def ask(self, line: bytes) -> dict[str, Any]:
        self.sock.sendall(line + b"\n")
        reply = self.buf.readline(control.MAX_LINE + 1)
        assert reply.endswith(b"\n"), f"no answer to {line[:200]!r}"
        out = json.loads(reply)
        assert isinstance(out, dict) and isinstance(out.get("ok"), bool), out
        if not out["ok"]:
            assert isinstance(out["type"], str) and isinstance(out["error"], str) and out["error"], out
        return out

    def close(self) -> None:
        self.buf.close()
        self.sock.close()


# -- the framing and the schemas, no daemon -----------------------------------------------

@pytest.mark.parametrize("line, error", [
    (b"[" * 100_000 + b"]" * 100_000, "Expected `object`, got `array`"),  # refused at the first byte
    (b'{"op": "x", "args": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}", "nested deeper than 32 levels"),
    (b'{"op": "allow", "args": {"a": ' + b"[" * 40 + b"]" * 40 + b"}}", "nested deeper than 32 levels"),
    (b'{"op": "allow", "args": {}, "extra": 1}', "unknown field `extra`"),
    (b'{"op": "", "args": {}}', 'a request is {"op": "...", "args": {...}}'),
    (b'{"op": "allow", "args": []}', "Expected `object`, got `array`"),
    (b'{"op": "allow", "args": {"ttl": NaN}}', "request is not JSON"),
    (b'{"op": "allow", "args": {"ttl": 1e400}}', "Number out of range"),
    (b'\xff\xfe{"op": "ping"}', "request is not JSON"),
])
def test_bad_lines_are_refused_before_any_operation(line: bytes, error: str) -> None:
    with pytest.raises(ValidationError) as exc:
        control.parse_request(line)
    assert error in str(exc.value)


def test_depth_32_passes_and_33_does_not() -> None:
    ok = b'{"op": "x", "args": {"a": ' + b"[" * 30 + b"]" * 30 + b"}}"
    assert control.parse_request(ok).op == "x"
    with pytest.raises(ValidationError):
        control.parse_request(b'{"op": "x", "args": {"a": ' + b"[" * 31 + b"]" * 31 + b"}}")


@pytest.mark.parametrize("op, args, error", [
    ("allow", {"name": "x", "ttl": {"a": 1}}, "allow: argument 'ttl' must be a number or a string or null, "
                                               "got an object"),
    ("allow", {"sources": ["192.0.2.1"]}, "allow: argument 'name' is missing"),
    ("allow", {"name": "x", "sources": [1]}, "allow: argument 'sources[0]' must be a string, got a whole number"),
    ("block", {"address": "192.0.2.1", "offences": True}, "argument 'offences' must be a whole number or null, "
                                                          "got a boolean"),
    ("log", {"limit": 0}, "log: argument 'limit' must be at least 1"),
    ("entries", {"ssh_clients": "192.0.2.1"}, "argument 'ssh_clients' must be a list, got a string"),
    ("dialin.grant", {"token": "t", "address": ["192.0.2.1"]}, "argument 'address' must be a string, got a list"),
    ("dialin.verify", {"passcode": 1234}, "argument 'passcode' must be a string or null, got a whole number"),
])
def test_arguments_of_the_wrong_shape_name_the_argument(op: str, args: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError) as exc:
        check_args(op, args)
    assert error in str(exc.value)


def test_what_the_cli_and_the_agi_send_passes() -> None:
    check_args("allow", {"name": "office", "sources": ["192.0.2.7"], "services": ["ssh"], "ttl": "2h",
                         "note": "", "replace": False, "force": False, "actor": "uid=0", "ssh_clients": [],
                         "endpoints": ["1001"], "zone": None})
    check_args("block", {"address": "192.0.2.9", "ttl": None, "reason": "", "force": False, "actor": "uid=0"})
    check_args("log", {"limit": 50, "subject": "office", "actor": "uid=0"})
    check_args("quarantine_drop", {"ids": [1, 2], "actor": "uid=0"})
    check_args("dialin.verify", {"passcode": "12345678", "callerid": "+15551234", "channel_type": "PJSIP",
                                 "endpoint": "anonymous", "remote_addr": "198.51.100.7:5060"})
    check_args("dialin.grant", {"token": "a.b", "address": "198.51.100.7", "callerid": "+15551234"})


# -- a real tm4d -------------------------------------------------------------------------

json_scalar = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
               | st.sampled_from(["192.0.2.7", "198.51.100.0/24", "224.0.0.1", "ff02::1", "0.0.0.0/0", "1h",
                                  "-5m", "ssh", "sip-udp", "office", "\n", "\x1b[2J", "admin", "dialin"]))
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)
ARG_NAMES = sorted({k for s in SCHEMAS.values() for k in getattr(s, "__struct_fields__", ())}
                   | {"ids", "scan", "all", "x"})
READ_ONLY = ["entries", "entry", "bans", "log", "safe_mode", "status", "ping", "drift_check", "quarantine",
             "dialin.verify", "dialin.check_address", "dialin.external_address"]
WRITES = ["allow", "revoke", "block", "unblock", "sweep", "dialin.grant", "quarantine_drop", "nosuch", ""]


@st.composite
def request_lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:  # not JSON, or not a request (a blank line is a keep-alive: no answer)
        junk = draw(st.binary(max_size=60)).replace(b"\n", b" ")
        return junk if junk.strip() else b"x"
    if kind == 1:
        return json.dumps(draw(json_value)).encode()
    args = draw(st.dictionaries(st.sampled_from(ARG_NAMES), json_value, max_size=5))
    req: dict[str, Any] = {"op": draw(st.sampled_from(READ_ONLY + WRITES) | st.text(max_size=10)), "args": args}
    if kind == 2:
        req[draw(st.sampled_from(["extra", "op2"]))] = draw(json_value)
    if kind == 3:
        depth = draw(st.integers(1, 300))
        return json.dumps(req)[:-1].encode() + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    return json.dumps(req).encode()


def test_random_lines_always_get_a_json_answer_and_tm4d_stays_up(lab: Lab, tmp_path: Path) -> None:
    d = Tm4d(tmp_path, lab.pbx.ns).start()
    conn = Conn(d.socket)
    try:
        assert conn.ask(b'{"op": "allow", "args": {"name": "x", "sources": ["192.0.2.7"], "ttl": {"a": 1}}}') == {
            "ok": False, "type": "ValidationError",
            "error": "allow: argument 'ttl' must be a number or a string or null, got an object"}
        deep = conn.ask(b'{"op": "allow", "args": {"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}")
        assert deep["type"] == "ValidationError" and "nested deeper" in deep["error"]

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(request_lines())
        def one(line: bytes) -> None:
            c = Conn(d.socket)
            try:
                out = c.ask(line)
            finally:
                c.close()
            seen[out["type"] if not out["ok"] else "ok"] = seen.get(out["type"] if not out["ok"] else "ok", 0) + 1

        seen: dict[str, int] = {}
        one()
        assert seen.get("ok", 0) > 10, seen  # the operations ran too, not only the gate
        assert d.alive() and d.call("ping")["pong"] is True
    finally:
        conn.close()
        log = d.log()
        d.close()
    assert "Traceback" not in log and "control_op_failed" not in log and "control_client_failed" not in log, log


def test_the_direct_fallback_checks_the_same_schema() -> None:
    """`tm4` without tm4d runs the operation in-process: the same refusal, before the core."""
    from tm4.ops.root import run_local

    with pytest.raises(ValidationError, match="argument 'ttl' must be a number or a string or null"):
        run_local(None, "allow", {"name": "x", "ttl": {"a": 1}})  # type: ignore[arg-type]
