"""The ACL reload and status over AMI, against the simulator built from the real
Asterisk 22 captures: exact framing, pending reloads while AMI is down, and what
Asterisk reports versus what tm4 rendered."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ami_acl_sim import FIXTURES, REPLAYED, AmiAclSim, User, capture_blocks
from fakes import MemoryKernel

from tm4.asterisk.acl import (
    ACL_FILE,
    acl_path,
    acl_status,
    desired_rules,
    flush_pending,
    parse_acl_show,
    reload_pending,
    sync_acl,
    sync_acl_async,
)
from tm4.asterisk.reload import (
    AmiActionError,
    AmiAuthError,
    AmiNotPermitted,
    AmiUnavailable,
    encode,
    reload_module,
    run_command,
)
from tm4.core.config import AmiConfig, parse_config
from tm4.core.errors import ValidationError
from tm4.ops.engine import Core

ETC = Path(__file__).parent.parent / "fixtures" / "asterisk" / "etc"
SECRET = "tm4secret"


def captured_sent(name: str, action: str) -> bytes:
    """The first client message of `action` in a capture."""
    return next(b.data for b in capture_blocks(FIXTURES / name)
                if b.direction == "SENT" and b.data.startswith(f"Action: {action}\r\n".encode()))


def normalise(msg: bytes) -> bytes:
    msg = re.sub(rb"^ActionID: .*\r$", b"ActionID: <id>\r", msg, flags=re.M)
    return re.sub(rb"^Secret: .*\r$", b"Secret: <secret>\r", msg, flags=re.M)


@pytest.fixture
def sim() -> Iterator[AmiAclSim]:
    s = AmiAclSim(users={"tm4": User(SECRET, write={"system", "command"})}).start()
    yield s
    s.stop()


def ami(sim: AmiAclSim, secret: str = SECRET) -> AmiConfig:
    return AmiConfig(host="127.0.0.1", port=sim.port, username="tm4", secret=secret)


# -- the captures themselves --------------------------------------------------------

def test_capture_blocks_are_byte_exact() -> None:
    """Every block turned back into bytes has the length the capture declared."""
    blocks = [b for n in ("ami_acl_commands.txt", "ami_cmd_test.txt") for b in capture_blocks(FIXTURES / n)]
    assert len(blocks) > 40
    for b in blocks:
        assert len(b.data) == b.declared, b.data
    raw = (FIXTURES / "ami_cmd_test.raw").read_bytes()
    assert all(b.data in raw for b in capture_blocks(FIXTURES / "ami_cmd_test.txt"))
    assert {"module reload acl", "manager reload", "acl show", "pjsip reload"} <= set(REPLAYED)


# -- framing ------------------------------------------------------------------------

def test_reload_acl_framing(sim: AmiAclSim) -> None:
    msg = asyncio.run(reload_module(ami(sim), "acl"))
    assert msg == "Module Reloaded" and sim.reloads == ["acl"]
    login, reload, logoff = sim.sent_by_client()
    # Login and Logoff are byte for byte what the captured client sent (ids and secret aside)
    assert normalise(login) == normalise(captured_sent("ami_acl_commands.txt", "Login"))
    assert normalise(logoff) == normalise(captured_sent("ami_acl_commands.txt", "Logoff"))
    assert normalise(reload) == b"Action: Reload\r\nActionID: <id>\r\nModule: acl\r\n\r\n"
    out = [m for d, m in sim.transcript if d == "out"]
    assert out[0] == b"Asterisk Call Manager/11.0.0\r\n"
    aid = re.search(rb"ActionID: (.*)\r", reload).group(1)  # type: ignore[union-attr]
    assert out[2] == b"Response: Success\r\nActionID: " + aid + b"\r\nMessage: Module Reloaded\r\n\r\n"


def test_command_framing_and_replayed_answer(sim: AmiAclSim) -> None:
    lines = asyncio.run(run_command(ami(sim), "module reload acl"))
    assert lines == ["Module 'acl' reloaded successfully."]
    listcmds, sent = sim.sent_by_client()[1:3]  # first: may this user send Command at all?
    assert normalise(listcmds) == b"Action: ListCommands\r\nActionID: <id>\r\n\r\n"
    captured = next(b.data for b in capture_blocks(FIXTURES / "ami_acl_commands.txt")
                    if b.direction == "SENT" and b"Command: module reload acl\r\n" in b.data)
    assert normalise(sent) == normalise(captured)
    answer = [m for d, m in sim.transcript if d == "out"][3]
    assert normalise(answer) == normalise(REPLAYED["module reload acl"])


def test_command_output_keeps_empty_and_indented_lines(sim: AmiAclSim) -> None:
    assert asyncio.run(run_command(ami(sim), "acl show")) == ["", "acl", "---"]


def test_errors_are_typed(sim: AmiAclSim) -> None:
    with pytest.raises(AmiActionError, match="No such module"):
        asyncio.run(reload_module(ami(sim), "no_such_module"))
    with pytest.raises(AmiActionError, match="No such command 'pjsip reload'"):
        asyncio.run(run_command(ami(sim), "pjsip reload"))
    with pytest.raises(AmiAuthError, match="Authentication failed"):
        asyncio.run(reload_module(ami(sim, "wrong"), "acl"))
    with pytest.raises(AmiAuthError, match="no AMI secret"):
        asyncio.run(reload_module(ami(sim, ""), "acl"))
    port = sim.port
    sim.stop()
    with pytest.raises(AmiUnavailable):
        asyncio.run(reload_module(AmiConfig(port=port, secret=SECRET), "acl", timeout=1))
    with pytest.raises(ValidationError):
        encode("Command", "x", [("Command", "acl show\r\nAction: Originate")])
    with pytest.raises(ValidationError):
        asyncio.run(reload_module(AmiConfig(port=port, secret=SECRET), "acl\r\nAction: Originate"))


def test_least_privilege_user_is_never_made_to_send_command() -> None:
    """Asterisk answers a refused Command with an Error-severity RequestNotAllowed security
    event (real2/ami/command_denied): tm4 asks ListCommands first and does not send it."""
    with AmiAclSim(users={"tm4": User(SECRET)}) as s:  # write=system only
        assert asyncio.run(reload_module(ami(s), "acl")) == "Module Reloaded"
        with pytest.raises(AmiNotPermitted, match="may not send Command .*write=command"):
            asyncio.run(run_command(ami(s), "acl show tm4"))
        sent = [ami_action(m) for m in s.sent_by_client()]
    assert sent == ["Login", "Reload", "Logoff", "Login", "ListCommands", "Logoff"]
    assert s.security_events == []


# -- the ACL kept in step -----------------------------------------------------------

class Env:
    def __init__(self, tmp_path: Path, sim: AmiAclSim):
        self.etc = tmp_path / "asterisk"
        shutil.copytree(ETC, self.etc)
        self.sim = sim
        sim.config_dir = self.etc
        cfg = parse_config({
            "state_dir": str(tmp_path / "state"),
            "asterisk": {"config_dir": str(self.etc)},
            "ami": {"port": sim.port, "secret": SECRET},
        })
        self.core = Core(cfg, backend=MemoryKernel(), protect=[])

    def install_file(self) -> None:
        """What `tm4 asterisk install` leaves: the file and the include."""
        acl = self.etc / "acl.conf"
        acl.write_text(acl.read_text() + f'#include "{ACL_FILE}"\n')
        acl_path(self.core.config).write_text("")

    def loaded(self) -> list[Any] | None:
        return parse_acl_show(asyncio.run(run_command(self.core.config.ami, "acl show tm4")))


@pytest.fixture
def env(tmp_path: Path, sim: AmiAclSim) -> Env:
    return Env(tmp_path, sim)


def test_sync_does_nothing_before_install(env: Env) -> None:
    env.core.allow("office", ["192.0.2.10"], ["sip-udp"])
    assert sync_acl(env.core) is False
    assert not acl_path(env.core.config).exists() and env.sim.reloads == []


def test_sync_writes_and_reloads_only_when_the_content_changes(env: Env) -> None:
    env.install_file()
    env.core.allow("office", ["192.0.2.10", "2001:db8::10"], ["sip-udp"])
    assert sync_acl(env.core) is True
    assert env.sim.reloads == ["acl"] and not reload_pending(env.core)
    assert env.loaded() == desired_rules(env.core.entries(), env.core.clock())
    # nothing changed for the ACL: no write, no reload
    env.core.allow("web", ["198.51.100.5"], ["https"])
    mtime = acl_path(env.core.config).stat().st_mtime_ns
    assert sync_acl(env.core) is False
    assert env.sim.reloads == ["acl"] and acl_path(env.core.config).stat().st_mtime_ns == mtime
    # a revoked grant leaves Asterisk's ACL too
    env.core.revoke("office")
    assert sync_acl(env.core) is True and env.sim.reloads == ["acl", "acl"]
    assert [s for s, _ in env.loaded() or []] == ["deny", "deny"]


def test_ami_down_keeps_the_file_right_and_reloads_when_it_is_back(env: Env) -> None:
    env.install_file()
    env.core.allow("office", ["192.0.2.10"], ["sip-udp"])
    port = env.sim.port
    env.sim.stop()
    res = asyncio.run(sync_acl_async(env.core, timeout=1))
    assert res.changed and res.pending and not res.reloaded and "unreachable" in res.error
    assert "permit = 192.0.2.10/255.255.255.255" in acl_path(env.core.config).read_text()
    assert reload_pending(env.core)
    # still pending after another change while down, and no exception
    env.core.allow("trunk", ["198.51.100.7"], ["sip-udp"])
    assert asyncio.run(sync_acl_async(env.core, timeout=1)).pending
    env.sim.start(port)  # AMI answers again; Asterisk still holds the ACL it loaded before
    assert env.loaded() is None  # ...which was none: tm4 was installed while AMI was down
    res = asyncio.run(flush_pending(env.core))
    assert res.reloaded and not res.pending and not reload_pending(env.core)
    assert env.sim.reloads == ["acl"]
    assert env.loaded() == desired_rules(env.core.entries(), env.core.clock())
    assert len(env.loaded() or []) == 4
    # a second flush has nothing to do
    assert not asyncio.run(flush_pending(env.core)).reloaded and env.sim.reloads == ["acl"]


def test_status_compares_asterisk_with_the_rendering(env: Env) -> None:
    env.install_file()
    env.core.allow("office", ["192.0.2.10"], ["sip-udp"])
    sync_acl(env.core)
    st = asyncio.run(acl_status(env.core))
    assert st.ok and st.include and st.current and st.asterisk_current is True and st.ami == "ok"
    assert st.asterisk_rules == ["deny 0.0.0.0/0.0.0.0", "deny ::/0", "permit 192.0.2.10/255.255.255.255"]
    # the file changed but Asterisk was not told: status sees the difference
    port = env.sim.port
    env.sim.stop()
    env.core.allow("trunk", ["198.51.100.7"], ["sip-udp"])
    asyncio.run(sync_acl_async(env.core, timeout=1))
    env.sim.config_dir = None  # Asterisk keeps what it loaded before
    acls = env.sim.acls
    env.sim.start(port)
    env.sim.acls = acls
    st = asyncio.run(acl_status(env.core))
    assert st.current and st.pending and st.asterisk_current is False and not st.ok
    assert "permit 198.51.100.7/255.255.255.255" not in (st.asterisk_rules or [])


def test_status_without_command_permission(tmp_path: Path) -> None:
    with AmiAclSim(users={"tm4": User(SECRET)}) as s:
        env = Env(tmp_path, s)
        env.install_file()
        sync_acl(env.core)
        st = asyncio.run(acl_status(env.core))
    assert st.asterisk_current is None and "write=command" in st.asterisk_note and st.ok
    assert "asterisk -rx 'acl show tm4'" in st.asterisk_note  # what the admin can run instead
    assert "Command" not in [ami_action(m) for m in s.sent_by_client()] and s.security_events == []


def ami_action(raw: bytes) -> str:
    m = re.match(rb"Action: (\S+)\r\n", raw)
    return m.group(1).decode() if m else ""


def test_status_notices_a_missing_include(env: Env) -> None:
    acl_path(env.core.config).write_text("")
    sync_acl(env.core)
    st = asyncio.run(acl_status(env.core))
    assert st.include is False and not st.ok
    assert st.asterisk_current is False and "no ACL named" in st.asterisk_note
