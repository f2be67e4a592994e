"""Every real AMI capture, replayed through the simulators: what the capture's client sent
is sent to the simulator, and the simulator's answer must have the framing (CRLF, blank
line), the field names in their order and the stable values (Response, Message, Event,
Privilege, EventList, ...) of what the real Asterisk 22 answered. Where they differ, the
simulator is wrong (the capture is the truth).

Answers are compared per action: the messages carrying its ActionID, and the events the
action itself caused (FullyBooted and the session's SuccessfulAuth after a Login,
RequestNotAllowed after a refused action, RequestBadFormat after an unknown one, Reload
after a Reload). Events raised by something else (a qualify, another session) are not the
action's answer.

Captures: real2/ami/ (command_denied, pjsip_show, restarts) and the first set
(tests/fixtures/ami/, ami_acl/, discover/ami/).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ami_capture
import pytest
from ami_acl_sim import AmiAclSim, User
from ami_capture import messages, shape
from ami_discover_sim import AmiDiscoverSim, SimEndpoint
from ami_replay_sim import ReplaySim
from ami_restart_sim import RestartSim, phases
from amisim import AmiSimulator, LoopThread

from tm4.lab.sim.ami import AmiServer

FIX = Path(__file__).parent.parent / "fixtures"
CAUSED = {
    "login": {"FullyBooted", "SuccessfulAuth"},
    "command": {"RequestNotAllowed"},
    "reload": {"Reload"},
}


def _aid(sent: bytes) -> str:
    return ami_capture.action_of(sent).get("actionid", "")


def answer_of(sent: bytes, got: bytes, known: set[str]) -> list[tuple[object, ...]]:
    """The shapes of the messages that answer `sent` (see the module doc)."""
    action = ami_capture.action_of(sent).get("action", "").lower()
    aid = _aid(sent)
    caused = CAUSED.get(action, set()) | ({"RequestBadFormat"} if action not in known else set())
    out = []
    own_auth = False
    for m in messages(got):
        if m.startswith(b"Asterisk Call Manager/"):
            out.append(shape(m))
            continue
        ev = re.match(rb"Event: ([A-Za-z]+)\r\n", m)
        if ev is None or (aid and b"\r\nActionID: " + aid.encode() + b"\r\n" in m):
            out.append(shape(m))
        elif ev.group(1).decode() in caused:
            if ev.group(1) == b"SuccessfulAuth":
                if own_auth:
                    continue  # another session's login
                own_auth = True
            out.append(shape(m))
    return out


def talk(port: int, turns: list[tuple[bytes, bytes]], settle: float = 0.15) -> list[bytes]:
    """Play the client's side of `turns` against a server; what came back after each."""
    got: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(settle)
        buf = _read_for(s, settle)
        got.append(buf)
        for sent, _ in turns[1:]:
            s.sendall(sent)
            got.append(_read_for(s, settle, want=_aid(sent)))
    return got


def _read_for(s: socket.socket, settle: float, want: str = "") -> bytes:
    """Read until `settle` s pass without bytes (at least until the answer to `want`)."""
    buf = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            if not want or b"ActionID: " + want.encode() + b"\r\n" in buf:
                break
            continue
        if not chunk:
            break
        buf += chunk
    return buf


def compare(turns: list[tuple[bytes, bytes]], got: list[bytes], known: set[str],
            only: set[str] | None = None) -> list[str]:
    diffs = []
    for (sent, real), mine in zip(turns, got, strict=True):
        action = ami_capture.action_of(sent).get("action", "") or "(banner)"
        if only is not None and action.lower() not in only and action != "(banner)":
            continue
        want, have = answer_of(sent, real, known), answer_of(sent, mine, known)
        if want != have:
            diffs.append(f"{action} {_aid(sent)}:\n  real: {want}\n  sim:  {have}")
    return diffs


# -- real2: command_denied ---------------------------------------------------------------

def real2_turns(capture: str) -> tuple[list[tuple[bytes, bytes]], dict[str, str]]:
    conn = next(iter(ami_capture.load(capture).conns.values()))
    turns = conn.turns()
    login = next(ami_capture.action_of(s) for s, _ in turns if b"Action: Login" in s)
    return turns, login


@contextlib.contextmanager
def lab_server(user: str, secret: str, read: str, write: str) -> Iterator[int]:
    srv = AmiServer("", user, secret, port=0, read=read, write=write)
    try:
        yield srv.port
    finally:
        srv.close()


@contextlib.contextmanager
def acl_sim(user: str, secret: str, read: str, write: str) -> Iterator[int]:
    u = User(secret, set(read.split(",")) - {""}, set(write.split(",")) - {""})
    with AmiAclSim(users={user: u}) as sim:
        yield sim.port


@contextlib.contextmanager
def guard_sim(user: str, secret: str, read: str, write: str) -> Iterator[int]:
    lt = LoopThread()
    sim = AmiSimulator(users={user: secret}, write=write)
    try:
        lt.run(sim.start())
        yield sim.port
    finally:
        lt.run(sim.stop(shutdown_event=False))
        lt.close()


SIMS: dict[str, Callable[[str, str, str, str], Any]] = {
    "lab AmiServer": lab_server, "tests ami_acl_sim": acl_sim, "tests amisim": guard_sim,
}
KNOWN = {"login", "logoff", "command", "reload", "ping", "listcommands"} | {
    a.lower() for a in ReplaySim(["pjsip_show"]).allowed()}
USERS = {"command_denied": ("system,security", "system"), "command_denied.observer": ("security", "")}


# amisim's users all read system,security (the guard's user): the observer's session
# (read=security only) is not its kind, so that pair is not generated at all.
@pytest.mark.parametrize(("capture", "sim"), [
    (c, s) for c in sorted(USERS) for s in sorted(SIMS)
    if not (s == "tests amisim" and c.endswith("observer"))])
def test_command_denied_through_each_simulator(capture: str, sim: str) -> None:
    turns, login = real2_turns(capture)
    read, write = USERS[capture]
    with SIMS[sim](login["username"], login["secret"], read, write) as port:
        got = talk(port, turns)
    diffs = compare(turns, got, KNOWN)
    assert not diffs, "\n".join(diffs)


# -- real2: PJSIP inventory ----------------------------------------------------------------

# The capture's endpoints (real2/etc/pjsip.conf), as the discovery simulator describes them.
CAPTURED_ENDPOINTS = [
    SimEndpoint("1001", auth="1001", registered_contact="sip:1001@192.0.2.11:5060"),
    SimEndpoint("1002", auth="1002"),
    SimEndpoint("anonymous", aors=False),
    SimEndpoint("prov-a", transport="transport-udp", aor_contacts="sip:198.51.100.200:5060",
                identifies=[("prov-a", "198.51.100.200/255.255.255.255")], outbound_auth="prov-a-auth",
                registration="sip:198.51.100.200"),
    SimEndpoint("prov-b", transport="transport-udp", aor_contacts="sip:198.51.100.201:5060"),
    SimEndpoint("prov-c", transport="transport-udp", aor_contacts="sip:sip.example.test"),
]
DISCOVERY_ACTIONS = {"login", "pjsipshowendpoints", "pjsipshowendpoint", "pjsipshowregistrationsoutbound",
                     "logoff"}


@pytest.mark.parametrize("capture", ["pjsip_show", "pjsip_show_prequalify"])
def test_pjsip_inventory_through_the_discovery_simulator(capture: str) -> None:
    turns, login = real2_turns(capture)
    with AmiDiscoverSim(CAPTURED_ENDPOINTS, username=login["username"], secret=login["secret"]) as sim:
        got = talk(sim.port, turns)
    # it speaks only what discovery asks; those answers must be Asterisk's
    diffs = compare(turns, got, KNOWN, only=DISCOVERY_ACTIONS)
    assert not diffs, "\n".join(diffs)


@pytest.mark.parametrize("capture", ["pjsip_show", "pjsip_show_prequalify", "command_denied"])
def test_replay_simulator_is_byte_exact(capture: str) -> None:
    turns, _ = real2_turns(capture)
    with ReplaySim([capture]) as sim:
        got = talk(sim.port, turns)
    for (_, real), mine in zip(turns, got, strict=True):
        assert mine == real


# -- real2: restarts -------------------------------------------------------------------------

def _classify(events: list[str], got: bytes) -> str:
    if "refused" in events:
        return "refused"
    if b"Asterisk is shutting down" in got:
        return "shutting-down"
    if b"Response: Success" in got:
        return "success"
    return "dead"


async def _attempt(port: int, login: bytes, settle: float) -> tuple[list[str], bytes]:
    events: list[str] = []
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return ["refused"], b""
    got = b""
    try:
        with contextlib.suppress(TimeoutError):
            got += await asyncio.wait_for(reader.readuntil(b"\r\n"), settle * 4)
        if got:
            writer.write(login)
            end = time.monotonic() + settle
            while time.monotonic() < end:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), max(0.001, end - time.monotonic()))
                except TimeoutError:
                    break
                if not chunk:
                    events.append("eof")
                    break
                got += chunk
    except (ConnectionResetError, asyncio.IncompleteReadError):
        events.append("reset")
    finally:
        writer.close()
    return events, got


@pytest.mark.parametrize("capture", ["restart", "restart_gracefully", "stop_start"])
def test_restart_probe_attempts_through_the_restart_simulator(capture: str, tmp_path: Path) -> None:
    """Each probe attempt, started at its captured time (x20), meets the outcome it met."""
    stretch = 20.0
    cap = ami_capture.load(f"{capture}.probe")
    bounds = [p.start for p in phases(capture)[1:]]
    attempts = [c for n, c in sorted(cap.conns.items()) if n != "c00"]
    secret = ami_capture.action_of(cap.conns["c00"].sent())["secret"]
    login = b"Action: Login\r\nActionID: probe\r\nUsername: tm4\r\nSecret: " + secret.encode() + b"\r\n\r\n"

    async def main() -> list[tuple[str, str, str]]:
        sim = RestartSim(capture, "tm4", secret, tmp_path / "security", stretch=stretch)
        await sim.start()
        try:
            await sim.restart()
            t0 = time.monotonic()

            async def one(c: ami_capture.Conn) -> tuple[str, str, str]:
                await asyncio.sleep(max(0.0, t0 + c.start * stretch / 1000 - time.monotonic()))
                events, got = await _attempt(sim.port, login, settle=0.004 * stretch)
                return c.name, _outcome_of(c), _classify(events, got)

            # each attempt on its own, at its own time, as the probe did; one too close to a
            # phase change cannot tell which side it fell on
            return list(await asyncio.gather(*(one(c) for c in attempts
                                               if min(abs(c.start - b) for b in bounds) >= 1.5)))
        finally:
            await sim.stop()

    results = asyncio.run(main())
    assert len(results) >= 3
    wrong = [r for r in results if r[1] != r[2]]
    assert not wrong, wrong


def _outcome_of(c: ami_capture.Conn) -> str:
    return _classify([r.event for r in c.rows], c.received())


@pytest.mark.parametrize("capture", ["restart", "restart_gracefully", "stop_start"])
def test_restart_simulator_answers_with_the_captured_bytes(tmp_path: Path, capture: str) -> None:
    """The logged-in session's last events (Registry, Shutdown) and the new Asterisk's
    answer to the plain client's Login, shape for shape."""
    plain = ami_capture.load(capture)
    c00, c01 = plain.conns["c00"], plain.conns["c01"]
    secret = ami_capture.action_of(c00.sent())["secret"]

    async def main() -> tuple[bytes, bytes]:
        sim = RestartSim(capture, "tm4", secret, tmp_path / "security")
        await sim.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", sim.port)
            w.write(c00.sends()[0].data)
            await asyncio.sleep(0.1)
            await sim.restart()
            before = b""
            with contextlib.suppress(TimeoutError):
                while chunk := await asyncio.wait_for(r.read(65536), 1.0):
                    before += chunk
            await asyncio.sleep(0.2)
            r2, w2 = await asyncio.open_connection("127.0.0.1", sim.port)
            w2.write(c01.sends()[0].data)
            after = b""
            with contextlib.suppress(TimeoutError):
                while chunk := await asyncio.wait_for(r2.read(65536), 0.3):
                    after += chunk
            w.close()
            w2.close()
            return before, after
        finally:
            await sim.stop()

    before, after = asyncio.run(main())
    real_before = c00.received()
    assert [shape(m) for m in messages(before)] == [shape(m) for m in messages(real_before)]
    sent_at = c01.sends()[0].t
    real_after = b"".join(r.data for r in c01.rows if r.event == "recv" and r.t < sent_at + 250)
    # the late FullyBooted and the PeerStatus events come as captured, in the same order
    assert [shape(m) for m in messages(after)] == [shape(m) for m in messages(real_after)]


# -- the first set -------------------------------------------------------------------------

def first_set_turns(name: str) -> list[list[tuple[bytes, bytes]]]:
    """Per session, (sent, received after it) from a first-set readable capture: `####`
    headers (connected / BANNER / SENT n / RECV n / closed), lines ending in a shown \\r\\n."""
    sessions: list[list[tuple[bytes, bytes]]] = []
    into: str | None = None
    for line in (FIX / "ami_acl" / name).read_text(encoding="utf-8").splitlines():
        if line.startswith("####"):
            into = None
            if " connected from " in line:
                sessions.append([(b"", b"")])
            elif "<<< BANNER" in line or "<<< RECV" in line:
                into = "recv"
            elif ">>> SENT" in line:
                into = "sent"
                sessions[-1].append((b"", b""))
            continue
        if into is None or not line.endswith("\\r\\n") or not sessions:
            continue
        data = line[:-4].encode() + b"\r\n"
        sent, got = sessions[-1][-1]
        sessions[-1][-1] = (sent + data, got) if into == "sent" else (sent, got + data)
    return sessions


@pytest.mark.parametrize("name", ["ami_acl_commands.txt", "ami_cmd_test.txt"])
def test_first_set_commands_through_the_acl_simulator(name: str, tmp_path: Path) -> None:
    sessions = first_set_turns(name)
    assert sessions
    checked = 0
    for turns in sessions:
        login = next(ami_capture.action_of(s) for s, _ in turns if b"Action: Login" in s)
        # Asterisk's config of that capture: acl.conf with [lab_acl]
        with AmiAclSim(FIX / "asterisk" / "etc", users={login["username"]: User(
                login["secret"], {"system", "security"}, {"system", "command"})}) as sim:
            got = talk(sim.port, turns)
        diffs = compare(turns, got, KNOWN, only={"login", "command", "logoff"})
        assert not diffs, "\n".join(diffs)
        checked += 1
    assert checked == len(sessions)


@pytest.mark.parametrize("capture", ["ami_login_ok.raw", "ami_failed_logins.raw"])
def test_first_set_logins_through_the_guard_simulator(capture: str) -> None:
    raw = (FIX / "discover" / "ami" / capture).read_bytes()
    conns = [b"Asterisk Call Manager/" + part for part in raw.split(b"Asterisk Call Manager/")[1:]]
    for data in conns:
        msgs = messages(data)
        sent = [m for m in msgs if m.startswith(b"Action: ")]
        real = b"".join(m for m in msgs[1:] if not m.startswith(b"Action: "))
        login = ami_capture.action_of(sent[0])
        users = {"tm4": "tm4secret"}
        refused = b"Response: Error" in real
        # the right secret refused: the capture's third try came from a source the ACL denies
        acl_denies = refused and users.get(login.get("username", "")) == login.get("secret")
        lt = LoopThread()
        sim = AmiSimulator(users=users, login_fail_delay=0.05,
                           permit=(lambda ip: False) if acl_denies else None)
        try:
            lt.run(sim.start())
            got = talk(sim.port, [(b"", b""), (sent[0], real)], settle=0.3)
        finally:
            lt.run(sim.stop(shutdown_event=False))
            lt.close()
        want = answer_of(sent[0], real, KNOWN)
        have = [s for s in answer_of(sent[0], got[1], KNOWN)
                if s[0] != ("Event", b"SuccessfulAuth")]  # the first set's user had no security class
        assert have == want, (login.get("username"), have, want)


FIRST_SET_SESSIONS = {
    "ami_security_events": ["ami_security_events.raw", "ami_failed_logins.raw"],
    "ami_manager_acl": ["ami_manager_acl.raw"],
    "ami_tm4_acl": ["ami_tm4_acl.raw"],
}


@pytest.mark.parametrize("capture", sorted(FIRST_SET_SESSIONS))
def test_first_set_sessions_through_the_guard_simulator(capture: str) -> None:
    """Logins (accepted, wrong secret, unknown user, refused by manager.conf's ACL) and
    Logoffs of the first set's sessions; the events a SIP attack raised in between are not
    answers to anything and are compared by tests/asterisk/test_ami_samples.py."""
    from amisim import load_transcript

    checked = 0
    for session in load_transcript(f"{capture}.txt", FIRST_SET_SESSIONS[capture]):
        turns: list[tuple[bytes, bytes]] = [(b"", b"")]
        for c in session.chunks:
            if c.direction == "client":
                turns.append((c.data, b""))
            else:
                s, got = turns[-1]
                turns[-1] = (s, got + c.data)
        login = ami_capture.action_of(turns[1][0])
        users = {"tm4": "tm4secret"}
        refused = b"Response: Error" in turns[1][1]
        acl_denies = refused and users.get(login.get("username", "")) == login.get("secret")
        lt = LoopThread()
        sim = AmiSimulator(users=users, login_fail_delay=0.05, permit=(lambda ip: False) if acl_denies else None)
        try:
            lt.run(sim.start())
            got = talk(sim.port, turns, settle=0.3)
        finally:
            lt.run(sim.stop(shutdown_event=False))
            lt.close()
        diffs = compare(turns, got, KNOWN, only={"login", "logoff"})
        assert not diffs, f"{capture} {session.peer}:\n" + "\n".join(diffs)
        checked += 1
    assert checked >= 1
