"""tm4d follows a zone change: after `tm4 daemon reload` every member has the zone's new
services, in the store and for real packets; a zone still in use stays."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from daemon_support import Tm4d, wait_until
from netlab import Echo, Lab

PHONE = "198.51.100.10"
DESK = "198.51.100.11"


@pytest.fixture
def net(lab: Lab) -> Iterator[Lab]:
    lab.client("phone", [f"{PHONE}/24"])
    lab.client("desk", [f"{DESK}/24"])
    echo = Echo(lab.pbx, udp=[5060], tcp=[22])
    try:
        yield lab
    finally:
        echo.close()


def test_members_follow_the_zone_on_reload(net: Lab, tm4d: Tm4d) -> None:
    phone, desk = net.hosts[1], net.hosts[2]
    tm4d.write_config('[zones.voip]\nservices = ["sip-udp"]\n')
    tm4d.start()
    for name, addr in (("phone", PHONE), ("desk", DESK)):
        e = tm4d.call("allow", name=name, sources=[addr], services=[], zone="voip")
        assert e["zone"] == "voip" and e["services"] == ["sip-udp"]
    for h in (phone, desk):
        assert h.udp_probe("198.51.100.1", 5060, timeout=0.5)
        assert not h.tcp_probe("198.51.100.1", 22, timeout=0.2)

    tm4d.write_config('[zones.voip]\nservices = ["ssh"]\n')
    tm4d.signal(signal.SIGHUP)
    assert wait_until(lambda: all(e["services"] == ["ssh"] for e in tm4d.call("entries")), 10), tm4d.log()
    for h in (phone, desk):
        assert wait_until(lambda h=h: h.tcp_probe("198.51.100.1", 22, timeout=0.3), 5)
        assert not h.udp_probe("198.51.100.1", 5060, timeout=0.2)

    # Deleting the zone while it is in use: refused, the members keep their services.
    tm4d.write_config("")
    tm4d.signal(signal.SIGHUP)
    assert wait_until(lambda: "zone_in_use" in tm4d.log(), 10), tm4d.log()
    assert all(e["services"] == ["ssh"] for e in tm4d.call("entries"))
    assert phone.tcp_probe("198.51.100.1", 22, timeout=0.5)
