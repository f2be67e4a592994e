"""The kernel's nftables ruleset generation: a counter bumped by every committed
transaction (any table), read with one netlink round trip (NFT_MSG_GETGEN).

Drift checks use it to skip listing a table nobody changed: with 100,000 bans a
listing costs nft most of a second, the generation read a few microseconds. Set
elements the kernel adds or times out by itself do not bump it.
"""

from __future__ import annotations

import os
import socket
import struct

from tm4.firewall.netns import in_netns

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NFTA_GEN_ID = 1


def _open(netns: str) -> socket.socket:
    make = lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)  # noqa: E731
    return in_netns(netns, make) if netns else make()


def request_message(seq: int) -> bytes:
    nfgen = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)  # family, NFNETLINK_V0, res_id
    msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
    return struct.pack("=IHHII", 16 + len(nfgen), msg_type, NLM_F_REQUEST, seq, 0) + nfgen


def parse_generation(data: bytes) -> int | None:
    """The NFTA_GEN_ID of an NFT_MSG_NEWGEN answer, or None if `data` is something else."""
    if len(data) < 20:
        return None
    length, msg_type = struct.unpack_from("=IH", data, 0)
    if msg_type == NLMSG_ERROR or (msg_type & 0xFF) != NFT_MSG_NEWGEN:
        return None
    off = 16 + 4  # nlmsghdr + nfgenmsg
    while off + 4 <= min(length, len(data)):
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4:
            return None
        if (atype & 0x3FFF) == NFTA_GEN_ID and alen >= 8:
            return int(struct.unpack_from(">I", data, off + 4)[0])
        off += (alen + 3) & ~3
    return None


class GenerationReader:
    """Keeps one netlink socket (in `netns`, when given) for repeated reads."""

    def __init__(self, netns: str = ""):
        self._sock = _open(netns)
        self._sock.settimeout(1.0)
        self._seq = os.getpid() & 0xFFFF

    def read(self) -> int | None:
        self._seq += 1
        try:
            self._sock.send(request_message(self._seq))
            return parse_generation(self._sock.recv(65536))
        except OSError:
            return None

    def close(self) -> None:
        self._sock.close()
