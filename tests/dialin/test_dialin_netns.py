"""Dial-in against a real kernel: after the call, real packets from the granted address pass.

The PBX is a network namespace with tm4's nftables table; callers' devices are
client namespaces. The calls come in over FastAGI and classic AGI (root
fallback: the AGI child opens the namespace's kernel itself).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from agisim import REPO, Caller, Channel, Line, python, run_fastagi, run_stdio
from dialin_support import add_passcode, entry_addresses, fastagi_server, make_core, write_config
from netlab import Echo, Host, Lab

from tm4.ops.engine import Core

CODE = "48213977"


@pytest.fixture
def pbx(lab: Lab, tmp_path: Path) -> Iterator[tuple[Lab, Core, Echo]]:
    core = make_core(tmp_path, {"external_address": "198.51.100.1"}, netns=lab.pbx.ns)
    write_config(tmp_path, {"external_address": "198.51.100.1"}, netns=lab.pbx.ns)
    core.apply()
    add_passcode(core, "alice", CODE)
    echo = Echo(lab.pbx, udp=[5060], tcp=[5060, 5061])
    try:
        yield lab, core, echo
    finally:
        echo.close()


class Watching(Channel):
    """A channel that probes the firewall the moment it is told to say "access granted"."""

    def __init__(self, *a: object, probe: Host, dst: str, **kw: object):
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.probe, self.dst = probe, dst
        self.open_at_access_granted: bool | None = None

    def handle(self, cmd: str) -> list[str]:
        if cmd.startswith("STREAM FILE tm4/access-granted"):
            self.open_at_access_granted = self.probe.udp_probe(self.dst, 5060, timeout=0.3)
        return super().handle(cmd)


def test_fastagi_grant_opens_the_kernel_before_access_granted(pbx: tuple[Lab, Core, Echo]) -> None:
    lab, core, _ = pbx
    phone = lab.client("phone", ["203.0.113.7/24"])
    other = lab.client("other", ["203.0.113.8/24"])
    assert not phone.udp_probe("203.0.113.1", 5060), "closed before the call"
    with fastagi_server(core) as app:
        ch = Watching(Line(), Caller(keys=[CODE + "#", "203*0*113*7#", "1"]), network=True,
                      probe=phone, dst="203.0.113.1")
        run_fastagi("127.0.0.1", app.port, ch)
    assert ch.open_at_access_granted is True, "the rule is live before the caller hears 'access granted'"
    assert phone.udp_probe("203.0.113.1", 5060)
    assert phone.tcp_probe("203.0.113.1", 5061), "SIP over TLS too (default grant_services)"
    assert not other.udp_probe("203.0.113.1", 5060), "only the granted address"
    assert entry_addresses(core, "dialin-alice") == ["203.0.113.7"]


def test_a_new_grant_closes_the_old_address(pbx: tuple[Lab, Core, Echo]) -> None:
    lab, core, _ = pbx
    hotel = lab.client("hotel", ["203.0.113.7/24"])
    cafe = lab.client("cafe", ["198.51.100.77/24"])
    with fastagi_server(core) as app:
        run_fastagi("127.0.0.1", app.port,
                    Channel(Line(), Caller(keys=[CODE + "#", "203*0*113*7#", "1"]), network=True))
        assert hotel.udp_probe("203.0.113.1", 5060)
        run_fastagi("127.0.0.1", app.port,
                    Channel(Line(), Caller(keys=[CODE + "#", "198*51*100*77#", "1"]), network=True))
    assert cafe.udp_probe("198.51.100.1", 5060)
    assert not hotel.udp_probe("203.0.113.1", 5060), "roaming leaves no trail of open addresses"


def test_menu_1_lets_in_the_calling_ipv6_device(pbx: tuple[Lab, Core, Echo]) -> None:
    lab, core, _ = pbx
    phone = lab.client("sipv6", ["2001:db8::77/64"])
    assert not phone.udp_probe("2001:db8::1", 5060)
    with fastagi_server(core) as app:
        ch = Channel(Line.pjsip("anonymous", "[2001:db8::77]:5062"), Caller(keys=[CODE + "#", "1", "1"]),
                     network=True)
        run_fastagi("127.0.0.1", app.port, ch)
    assert ch.said[0] == "2001:db8::77"
    assert phone.udp_probe("2001:db8::1", 5060)


def test_the_pbx_own_address_cannot_be_granted(pbx: tuple[Lab, Core, Echo]) -> None:
    _, core, _ = pbx
    with fastagi_server(core) as app:
        ch = Channel(Line(), Caller(keys=[CODE + "#", "203*0*113*1#", None, None]), network=True)
        run_fastagi("127.0.0.1", app.port, ch)
    assert any(c.startswith("STREAM FILE tm4/addr-own ") for c in ch.commands)
    assert entry_addresses(core, "dialin-alice") == []


def test_classic_agi_as_root_opens_the_kernel_itself(pbx: tuple[Lab, Core, Echo], tmp_path: Path) -> None:
    lab, core, _ = pbx
    phone = lab.client("classic", ["192.0.2.77/24"])
    sock = str(tmp_path / "no-tm4d.sock")
    ch = Channel(Line(), Caller(keys=[CODE + "#", "192*0*2*77#", "1"]), args=[sock])
    env = {**os.environ, "TM4_CONFIG": str(tmp_path / "tm4.toml"), "TM4_NO_SSH_PROTECT": "1"}
    run = run_stdio([python(), str(REPO / "agi-bin" / "tm4-dialin.agi"), sock], ch, env=env)
    assert run.returncode == 0, run.stderr
    assert "STREAM FILE tm4/access-granted \"\"" in ch.commands
    assert phone.udp_probe("192.0.2.1", 5060)
    assert entry_addresses(core, "dialin-alice") == ["192.0.2.77"]
