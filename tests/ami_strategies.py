"""Hypothesis strategies for hostile AMI input, shared by the AMI and guard property tests."""

from __future__ import annotations

from hypothesis import strategies as st

octet = st.integers(0, 255)
# Addresses that can never be a packet's source (tm4.core.model.NEVER_SOURCE), and some that
# can but must never be banned (loopback), next to ordinary documentation addresses.
NEVER_SOURCE = ["224.0.0.1", "239.255.255.250", "255.255.255.255", "0.0.0.0", "0.1.2.3", "::", "ff02::1",
                "ff05::1:3", "::ffff:224.0.0.1", "::ffff:255.255.255.255", "::ffff:0.0.0.0"]
V4 = st.one_of(
    st.builds(lambda a, b, c, d: f"{a}.{b}.{c}.{d}", octet, octet, octet, octet),
    st.sampled_from(["203.0.113.9", "224.0.0.1", "239.255.255.250", "255.255.255.255", "0.0.0.0",
                     "0.1.2.3", "127.0.0.1", "240.0.0.1", "192.0.2.255"]),
)
V6 = st.one_of(
    st.ip_addresses(v=6).map(str),
    st.sampled_from(["2001:db8::5", "ff02::1", "ff05::1:3", "::", "::1", "fe80::1%eth0",
                     "::ffff:224.0.0.1", "::ffff:203.0.113.7", "::ffff:0.0.0.0", "64:ff9b::cb00:7107"]),
)
HOSTS = st.one_of(V4, V6, V6.map(lambda h: f"[{h}]"), st.text(max_size=30))
FAMILIES = st.sampled_from(["IPV4", "IPV6", "ipv4", "IPv6", "IPV5", "", "ıpv4"])
TRANSPORTS = st.sampled_from(["UDP", "TCP", "TLS", "WS", "WSS", "udp", "SCTP", "", None])
PORTS = st.one_of(st.integers(0, 70000).map(str),
                  st.sampled_from(["", "-1", "²", "٥٠٦٠", "5060 ", "0x10", "99999999999999999999", None]))


@st.composite
def remote_addresses(draw: st.DrawFn) -> str:
    """Every RemoteAddress form: IPV4/UDP/a.b.c.d/port, IPV6/UDP/[..]/port, TCP/TLS/WS/WSS,
    no transport, no port, garbage, multicast/broadcast/unspecified/loopback hosts."""
    parts = [draw(FAMILIES)]
    t = draw(TRANSPORTS)
    if t is not None:
        parts.append(t)
    parts.append(draw(HOSTS))
    p = draw(PORTS)
    if p is not None:
        parts.append(p)
    return "/".join(parts)


KEYS = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)
# Anything but CRLF itself: lone CR, lone LF, NUL, ESC, C1, U+2028, any script.
VALUES = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60).filter(lambda v: "\r\n" not in v)
HEADERS = st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=8)
