"""`tm4 init` offers tunnels and private LAN interfaces for [interfaces], never trusting them."""

from __future__ import annotations

import json

from tm4.daemon.initsetup import zone_candidates

LINKS = json.dumps([
    {"ifname": "lo", "link_type": "loopback", "addr_info": [{"local": "127.0.0.1", "prefixlen": 8, "scope": "host"}]},
    {"ifname": "eth0", "link_type": "ether",
     "addr_info": [{"local": "192.0.2.10", "prefixlen": 24, "scope": "global"}]},
    {"ifname": "eth1", "link_type": "ether",
     "addr_info": [{"local": "10.20.0.5", "prefixlen": 24, "scope": "global"}]},
    {"ifname": "wg0", "link_type": "none", "addr_info": [{"local": "10.99.0.1", "prefixlen": 24, "scope": "global"}]},
    {"ifname": "tun0", "link_type": "none", "addr_info": []},
    {"ifname": "myvpn", "link_type": "none", "addr_info": []},
    {"ifname": "eth2", "link_type": "ether",
     "addr_info": [{"local": "fe80::1", "prefixlen": 64, "scope": "link"}]},
])


def test_tunnels_and_private_lans_are_offered_the_public_interface_never() -> None:
    got = zone_candidates(LINKS, public={"eth0"})
    assert got == [{"name": "eth1", "kind": "lan"}, {"name": "wg0", "kind": "tunnel"},
                   {"name": "tun0", "kind": "tunnel"}, {"name": "myvpn", "kind": "tunnel"}]
    assert {"name": "eth0", "kind": "lan"} in zone_candidates(LINKS, public=set())  # no default route known
    assert zone_candidates("[]", set()) == []
