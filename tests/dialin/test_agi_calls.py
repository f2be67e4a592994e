"""Whole dial-in calls through the real transports, Asterisk played by the simulator.

Three ways a call reaches tm4:
- fastagi:        agi://127.0.0.1:PORT/tm4-dialin, served in-process (tm4.dialin.fastagi);
- classic-socket: agi-bin/tm4-dialin.agi as a child process, asking a tm4d
                  control socket (tm4.ops.control.ControlServer with the dial-in ops);
- classic-root:   the same script with no tm4d, as root: the core in the child.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agisim import REPO, Caller, Channel, Line, Run, python, run_fastagi, run_stdio
from dialin_support import (
    FakeTm4d,
    MemoryKernel,
    add_passcode,
    entry_addresses,
    fastagi_server,
    make_core,
    write_config,
)

from tm4.ops.engine import Core

CODE = "48213977"
SCRIPT = str(REPO / "agi-bin" / "tm4-dialin.agi")
HAPPY = [CODE + "#", "203*0*113*7#", "1"]
HAPPY_PROMPTS = ["tm4/enter-passcode", "tm4/enter-address", "tm4/you-entered", "tm4/confirm",
                 "tm4/access-granted", "tm4/server-address", "tm4/goodbye"]


@dataclass
class Rig:
    kind: str
    core: Core
    tmp: Path
    app: Any = None
    sock: Path | None = None
    runs: list[Run] = field(default_factory=list)

    def call(self, caller: Caller, line: Line | None = None) -> Channel:
        ch = Channel(line or Line(), caller, network=self.kind == "fastagi")
        if self.kind == "fastagi":
            run = run_fastagi("127.0.0.1", self.app.port, ch)
        else:
            sock = str(self.sock) if self.kind == "classic-socket" else str(self.tmp / "no-tm4d.sock")
            ch.args = [sock]
            env = {**os.environ, "TM4_CONFIG": str(self.tmp / "tm4.toml"), "TM4_NO_SSH_PROTECT": "1",
                   "TM4_NFT_SUBPROCESS": "1"}  # the config names a netns that does not exist
            run = run_stdio([python(), SCRIPT, sock], ch, env=env)
            assert run.returncode == 0, run.stderr
            # a hang-up is recognised as one (SIGHUP, -1, 511), never mistaken for a protocol error
            assert "agi_protocol_error" not in run.stderr and "Traceback" not in run.stderr, run.stderr
        self.runs.append(run)
        assert ch.missing == [], f"sounds that do not exist: {ch.missing}"
        return ch

    def entry(self) -> list[str]:
        return entry_addresses(self.core, "dialin-alice")

    def kernel(self) -> set[str]:
        backend = self.core.backend
        assert isinstance(backend, MemoryKernel)
        return backend.addresses()


@pytest.fixture(params=["fastagi", "classic-socket", "classic-root"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    with rig_for(request.param, tmp_path) as r:
        yield r


@pytest.fixture(params=["fastagi", "classic-socket"])
def rig2(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    """The transports whose kernel changes the test can see (the core lives in the test)."""
    with rig_for(request.param, tmp_path) as r:
        yield r


@pytest.fixture(params=["classic-socket", "classic-root"])
def classic(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    with rig_for(request.param, tmp_path) as r:
        yield r


@contextlib.contextmanager
def rig_for(kind: str, tmp: Path) -> Iterator[Rig]:
    core = make_core(tmp)
    write_config(tmp)
    add_passcode(core, "alice", CODE)
    if kind == "fastagi":
        with fastagi_server(core) as app:
            yield Rig(kind, core, tmp, app=app)
    elif kind == "classic-socket":
        with FakeTm4d(core, tmp / "tm4.sock") as d:
            yield Rig(kind, core, tmp, sock=d.path)
    else:
        yield Rig(kind, core, tmp)


def heard(ch: Channel) -> list[str]:
    """Prompts in the order the caller heard them (GET DATA prompts included)."""
    out = []
    for cmd in ch.commands:
        words = cmd.split()
        if cmd.startswith(("STREAM FILE", "GET DATA")):
            out.append(words[2])
    return out


def commands_after_hangup(ch: Channel) -> list[str]:
    i = next(i for i, (kind, line) in enumerate(ch.transcript)
             if kind == "RECV" and (line.startswith("200 result=-1") and "endpos=0" not in line))
    return [line for kind, line in ch.transcript[i:] if kind == "SEND"]


# -- the good call ----------------------------------------------------------------------

def test_right_passcode_and_address_grant(rig: Rig) -> None:
    ch = rig.call(Caller(keys=list(HAPPY)))
    assert heard(ch) == HAPPY_PROMPTS
    assert ch.said == ["203.0.113.7", "198.51.100.1"]
    assert ch.commands[0] == "ANSWER"
    assert rig.entry() == ["203.0.113.7"]
    assert ch.commands[-1].startswith('VERBOSE "tm4 dial-in: granted')
    if rig.kind != "classic-root":
        assert "203.0.113.7" in rig.kernel()


def test_the_line_closes_when_the_call_is_over(rig2: Rig) -> None:
    rig2.call(Caller(keys=list(HAPPY)))
    run = rig2.runs[-1]
    if rig2.kind == "fastagi":
        assert run.closed_s is not None and run.closed_s < 1.0, "FastAGI must close the socket itself"
    assert run.seconds < 5


# -- every bad input: the right prompt, no grant ----------------------------------------

def test_three_wrong_passcodes(rig: Rig) -> None:
    ch = rig.call(Caller(keys=["11111111#", "22222222#", "33333333#"]))
    assert heard(ch) == ["tm4/enter-passcode", "tm4/not-accepted"] * 3 + ["tm4/goodbye"]
    assert rig.entry() == []
    assert [r.action for r in rig.core.store.audit_log(50) if r.action.startswith("dialin")] == ["dialin-fail"] * 3


BAD = [
    ("999*1*1*1#", ["tm4/addr-invalid", "tm4/addr-range"]),
    ("1**2*3*4#", ["tm4/addr-invalid", "tm4/addr-empty-part"]),
    ("1*2*3#", ["tm4/addr-invalid", "tm4/addr-parts"]),
    ("1*2*3*4*5#", ["tm4/addr-invalid", "tm4/addr-parts"]),
    ("*203*0*113*7#", ["tm4/addr-invalid", "tm4/addr-empty-part"]),
    ("#", ["tm4/addr-invalid", "tm4/addr-empty"]),
    (None, ["tm4/addr-invalid", "tm4/addr-empty"]),
    ("1" * 16, ["tm4/addr-invalid", "tm4/addr-too-long"]),  # GET DATA stops at 16: no key left over
    ("127*0*0*1#", ["tm4/addr-loopback"]),
    ("198*51*100*1#", ["tm4/addr-own"]),  # the server's external address
]


@pytest.mark.parametrize(("keys", "why"), BAD, ids=[str(k)[:20] for k, _ in BAD])
def test_bad_address_three_times(rig2: Rig, keys: str | None, why: list[str]) -> None:
    ch = rig2.call(Caller(keys=[CODE + "#", keys, keys, keys]))
    assert heard(ch) == ["tm4/enter-passcode"] + ["tm4/enter-address", *why] * 3 + ["tm4/goodbye"]
    assert rig2.entry() == [] and rig2.kernel() == set()
    if keys and len(keys) >= 16:  # GET DATA stopped at its max digits
        assert "GET DATA tm4/enter-address 10000 16" in ch.commands


def test_passcode_timeouts_and_partial_entry(rig2: Rig) -> None:
    ch = rig2.call(Caller(keys=[None, "4821", "#"]))
    assert heard(ch) == ["tm4/enter-passcode", "tm4/not-accepted"] * 3 + ["tm4/goodbye"]
    assert rig2.entry() == []


def test_a_bad_try_then_a_good_one(rig2: Rig) -> None:
    ch = rig2.call(Caller(keys=[CODE + "#", "1*2*3#", "203*0*113*7#", "9", "1"]))
    assert "tm4/addr-parts" in heard(ch) and "tm4/invalid-choice" in heard(ch)
    assert rig2.entry() == ["203.0.113.7"]


# -- hang-ups -----------------------------------------------------------------------------

def _happy_commands() -> int:
    # ANSWER, GET DATA passcode, GET DATA address, STREAM you-entered, SAY ALPHA, GET DATA confirm,
    # STREAM access-granted, STREAM server-address, SAY ALPHA, STREAM goodbye (checked below)
    return 10


GRANTED_BY = 6  # the grant is made between the confirmation (5) and "access granted" (6)


@pytest.mark.parametrize("at", range(_happy_commands()))
def test_hangup_at_every_step(rig2: Rig, at: int) -> None:
    full = rig2.call(Caller(keys=list(HAPPY))) if at == 0 else None
    if full is not None:
        assert len([c for c in full.commands if not c.startswith("VERBOSE")]) == _happy_commands()
        rig2.core.revoke("dialin-alice", actor="test")
    ch = rig2.call(Caller(keys=list(HAPPY), hangup_at=at))
    after = commands_after_hangup(ch)
    assert all(c.startswith("VERBOSE") for c in after), f"channel commands after the hang-up: {after}"
    granted = any(c.startswith("STREAM FILE tm4/access-granted") for c in ch.commands)
    grant_done = rig2.entry() == ["203.0.113.7"]
    assert grant_done == (at >= GRANTED_BY)
    assert granted == (at >= GRANTED_BY)
    assert ("203.0.113.7" in rig2.kernel()) == grant_done, "store and kernel agree"
    assert rig2.runs[-1].seconds < 5


def test_classic_without_sighup_ends_on_511(tmp_path: Path) -> None:
    """Set(AGISIGHUP=no): no signal; only -1, then 511 tell of the hang-up."""
    with rig_for("classic-socket", tmp_path) as rig:
        ch = rig.call(Caller(keys=list(HAPPY), hangup_on="SAY ALPHA", sighup=False))
        assert ch.commands[-1] == 'SAY ALPHA 203.0.113.7 "12"' or ch.commands[-1].startswith("VERBOSE")
        assert not any(c.startswith("GET DATA tm4/confirm") for c in ch.commands)
        assert rig.entry() == []
        # a missing sound file (-1 endpos=0) is not a hang-up; the 511 that follows is
        ch = rig.call(Caller(keys=list(HAPPY), hangup_on="STREAM FILE tm4/you-entered", sighup=False,
                             hangup_endpos=0))
        assert ch.transcript[ch.transcript.index(("SEND", 'SAY ALPHA 203.0.113.7 "12"')) + 1][1].startswith("511")
        assert not any(c.startswith("GET DATA tm4/confirm") for c in ch.commands)
        assert rig.entry() == []


# -- keys typed ahead (real2 capture: a key pressed during a prompt without escape digits is lost)

def test_confirm_typed_during_the_read_back_completes_the_call(rig: Rig) -> None:
    """The capture's call 2: `203*0*113*7#1` in one go. The read-back listens for 1 and 2, the 1
    stops it, and the call is granted without asking again."""
    ch = rig.call(Caller(keys=[CODE + "#", "203*0*113*7#1"]))
    assert ch.escaped == ["1"] and ch.dropped == []
    assert 'STREAM FILE tm4/you-entered "12"' in ch.commands
    assert not any(c.startswith(("SAY ALPHA 203.0.113.7", "GET DATA tm4/confirm")) for c in ch.commands), \
        "the read-back stops at the key and the question is not asked again"
    assert rig.entry() == ["203.0.113.7"]
    assert ch.commands[-1].startswith('VERBOSE "tm4 dial-in: granted') and "typed_ahead=1" in ch.commands[-1]


def test_enter_again_typed_during_the_read_back(rig2: Rig) -> None:
    ch = rig2.call(Caller(keys=[CODE + "#", "203*0*113*7#2", "198*51*100*77#1"]))
    assert ch.escaped == ["2", "1"]
    assert rig2.entry() == ["198.51.100.77"], "2 typed ahead: enter again; then 1 confirms"


def test_passcode_typed_during_not_accepted(rig: Rig) -> None:
    """A wrong passcode, and the right one typed straight after it, while "not accepted" plays:
    its first key stops the prompt, the rest are read key by key (WAIT FOR DIGIT)."""
    ch = rig.call(Caller(keys=["11111111#" + CODE + "#", "203*0*113*7#", "1"]))
    assert ch.escaped == [CODE[0], *CODE[1:], "#"]
    assert heard(ch).count("tm4/enter-passcode") == 1, "the prompt is not played over the caller"
    assert "WAIT FOR DIGIT 10000" in ch.commands
    assert rig.entry() == ["203.0.113.7"]


def test_address_typed_during_the_refusal(rig2: Rig) -> None:
    ch = rig2.call(Caller(keys=[CODE + "#", "1*2*3#203*0*113*7#", "1"]))
    assert ch.escaped[:2] == ["2", "0"] and "tm4/addr-invalid" in heard(ch)
    assert heard(ch).count("tm4/enter-address") == 1
    assert rig2.entry() == ["203.0.113.7"]


def test_keys_typed_during_a_prompt_that_does_not_listen_are_lost(rig2: Rig) -> None:
    """After the last wrong try nothing is asked: "not accepted" listens to nothing, the keys are
    dropped as Asterisk drops them, and the call ends."""
    ch = rig2.call(Caller(keys=["1#", "2#", "3#" + CODE + "#"]))
    assert ch.escaped == [] and "".join(ch.dropped) == CODE + "#"
    assert heard(ch)[-1] == "tm4/goodbye" and rig2.entry() == []


# -- across calls ----------------------------------------------------------------------------

def test_brute_force_across_calls_locks_the_caller_out(tmp_path: Path) -> None:
    with rig_for("fastagi", tmp_path) as rig:
        _brute_force(rig)


def _brute_force(rig: Rig) -> None:
    line = Line(callerid="4445556")
    for _ in range(2):
        rig.call(Caller(keys=["11111111#", "22222222#", "33333333#"]), line)
    ch = rig.call(Caller(keys=[CODE + "#", CODE + "#", CODE + "#"]), line)
    assert heard(ch) == ["tm4/enter-passcode", "tm4/not-accepted"] * 3 + ["tm4/goodbye"]
    assert rig.entry() == []
    actions = [r.action for r in rig.core.store.audit_log(100)]
    assert actions.count("dialin-lockout") == 1
    other = rig.call(Caller(keys=list(HAPPY)), Line(callerid="7778889"))
    assert "tm4/access-granted" in heard(other)


def test_global_failures_make_every_try_wait(tmp_path: Path) -> None:
    with rig_for("fastagi", tmp_path) as rig:
        _many_callers(rig)


def _many_callers(rig: Rig) -> None:
    for i in range(7):  # 21 failures from 7 caller IDs, none locked out
        rig.call(Caller(keys=["11111111#"] * 3), Line(callerid=f"90{i}"))
    ch = rig.call(Caller(keys=list(HAPPY)), Line(callerid="5551234"))
    assert ch.waited_ms >= 1000, "the wait is spent on the line, before the verdict"
    assert rig.entry() == ["203.0.113.7"]
    assert [r.action for r in rig.core.store.audit_log(200)].count("dialin-alert") == 1


def test_a_new_grant_replaces_the_owners_previous_address(rig2: Rig) -> None:
    rig2.call(Caller(keys=list(HAPPY)))
    rig2.call(Caller(keys=[CODE + "#", "198*51*100*77#", "1"]))
    assert rig2.entry() == ["198.51.100.77"]
    assert "203.0.113.7" not in rig2.kernel() and "198.51.100.77" in rig2.kernel()


def test_direct_endpoint_offers_the_calling_address(rig2: Rig) -> None:
    line = Line.pjsip("anonymous", "[2001:db8::77]:5062")
    ch = rig2.call(Caller(keys=[CODE + "#", "1", "1"]), line)
    assert heard(ch)[:3] == ["tm4/enter-passcode", "tm4/menu", "tm4/your-address"]
    assert ch.said[0] == "2001:db8::77"
    assert "GET VARIABLE CHANNEL(pjsip,remote_addr)" in ch.commands
    assert rig2.entry() == ["2001:db8::77"]


def test_a_trunk_never_offers_its_address(rig2: Rig) -> None:
    ch = rig2.call(Caller(keys=list(HAPPY)), Line.pjsip("provider", "203.0.113.250:5060"))
    assert "tm4/menu" not in heard(ch) and rig2.entry() == ["203.0.113.7"]


# -- FastAGI robustness --------------------------------------------------------------------

def _connect(port: int, payload: bytes, wait: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        if payload:
            s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                data = s.recv(4096)
            except TimeoutError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_nc_z_and_broken_environments_do_not_freeze(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    add_passcode(core, "alice", CODE)
    with fastagi_server(core) as app:
        t = time.monotonic()
        r = subprocess.run(["nc", "-z", "127.0.0.1", str(app.port)], timeout=10)
        assert r.returncode == 0
        assert _connect(app.port, b"") == b""
        assert _connect(app.port, b"agi_network: yes\nagi_network_script: tm4-di") == b""
        assert _connect(app.port, b"GET / HTTP/1.0\r\n\r\n") == b""
        deadline = time.monotonic() + 3
        while app.dropped < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.dropped == 4 and time.monotonic() - t < 3
        ch = Channel(Line(), Caller(keys=list(HAPPY)), network=True)
        run_fastagi("127.0.0.1", app.port, ch)
        assert "tm4/access-granted" in heard(ch)


def test_a_silent_connection_does_not_hold_up_calls(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    add_passcode(core, "alice", CODE)
    with fastagi_server(core) as app:
        app.env_timeout = 0.5
        with socket.create_connection(("127.0.0.1", app.port)) as idle:
            ch = Channel(Line(), Caller(keys=list(HAPPY)), network=True)
            run_fastagi("127.0.0.1", app.port, ch)  # served while the other one sits there
            assert "tm4/access-granted" in heard(ch)
            idle.settimeout(3)
            assert idle.recv(10) == b"", "the silent peer is dropped after env_timeout"


def test_unknown_route_and_query_string(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    add_passcode(core, "alice", CODE)
    with fastagi_server(core) as app:
        ch = Channel(Line(), Caller(keys=list(HAPPY)), network=True, script="something-else")
        run_fastagi("127.0.0.1", app.port, ch)
        assert ch.commands == []
        ch = Channel(Line(), Caller(keys=list(HAPPY)), network=True, script="tm4-dialin?lang=en")
        run_fastagi("127.0.0.1", app.port, ch)
        assert "tm4/access-granted" in heard(ch), "a ?query does not break routing"


def _as_nobody(port: int, script: str) -> str:
    env = (f"agi_network: yes\nagi_network_script: {script}\nagi_request: agi://127.0.0.1/{script}\n"
           "agi_channel: Local/s@x-1;1\nagi_type: Local\nagi_callerid: 1\n\n")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "nc", "-w", "2", "127.0.0.1", str(port)], input=env, capture_output=True,
                       text=True, timeout=20)
    return r.stdout


def test_only_asterisk_uids_or_the_secret(tmp_path: Path) -> None:
    from conftest import need_root_tools

    need_root_tools("setpriv", "nc")
    core = make_core(tmp_path, {"fastagi_secret": "s3cret-Token"})
    add_passcode(core, "alice", CODE)
    with fastagi_server(core, allowed_uids={0}) as app:
        assert _as_nobody(app.port, "tm4-dialin") == "", "uid 65534 is not Asterisk"
        assert _as_nobody(app.port, "tm4-dialin?secret=wrong") == ""
        assert app.refused == 2
        assert _as_nobody(app.port, "tm4-dialin?secret=s3cret-Token").startswith("ANSWER\n")
        ch = Channel(Line(), Caller(keys=list(HAPPY)), network=True)
        run_fastagi("127.0.0.1", app.port, ch)  # this test runs as root: an allowed uid
        assert "tm4/access-granted" in heard(ch)


def test_peer_uid_from_proc(tmp_path: Path) -> None:
    from tm4.dialin.fastagi import tcp_peer_uid

    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    conn, peer = srv.accept()
    try:
        assert tcp_peer_uid(peer, conn.getsockname()) == os.getuid()
        assert tcp_peer_uid(("127.0.0.1", 1), conn.getsockname()) is None
    finally:
        c.close()
        conn.close()
        srv.close()


# -- classic AGI details -----------------------------------------------------------------

def test_classic_start_is_quick(classic: Rig) -> None:
    classic.call(Caller(keys=list(HAPPY)))
    first = classic.runs[-1].first_command_s
    assert first is not None and first < 1.0, "ANSWER comes before any heavy import"


def test_classic_without_tm4d_and_not_root_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the asterisk user with tm4d down: "unavailable", never the core (in-process, euid faked)."""
    from tm4.dialin import agi
    from tm4.dialin import client as dialin_client
    from tm4.dialin.call import conversation

    monkeypatch.setattr(dialin_client.os, "geteuid", lambda: 999)
    backend = dialin_client.LazyBackend(lambda: dialin_client.connect(str(tmp_path / "none.sock")))
    ch = Channel(Line(), Caller(keys=[CODE + "#"]))

    class Direct:
        env = dict(e.split(": ", 1) for e in ch.env_lines() if e)

        def command(self, text: str) -> agi.AgiReply:
            lines = ch.handle(text)
            if lines[-1].startswith("511"):
                raise agi.AgiHangup("dead")
            return agi.parse_reply(lines[-1])

    out = agi.drive(conversation(), Direct(), backend)  # type: ignore[arg-type]
    assert out.status == "unavailable"
    assert heard(ch) == ["tm4/enter-passcode", "tm4/unavailable", "tm4/goodbye"]
