"""Finding the admin's own SSH client, so no change can lock him out by accident.

`sudo` resets SSH_CONNECTION, so besides our own environment we read the
environment of every ancestor process (the login shell still has it) and, as a
last resort, the peer of the TCP socket held by the sshd process we descend from.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tm4.ops.engine import Core

PROC = Path("/proc")


def _ppid(pid: int) -> int:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0
    # comm may contain spaces and parentheses; fields resume after the last ')'
    return int(stat.rsplit(")", 1)[1].split()[1])


def ancestors(pid: int | None = None) -> list[int]:
    out: list[int] = []
    p = pid or os.getpid()
    while p > 1 and len(out) < 64:
        out.append(p)
        p = _ppid(p)
    return out


def _environ_client(pid: int) -> str | None:
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    for item in raw.split(b"\0"):
        if item.startswith((b"SSH_CONNECTION=", b"SSH_CLIENT=")):
            value = item.split(b"=", 1)[1].decode(errors="replace").split()
            if value:
                return value[0]
    return None


def _socket_inodes(pid: int) -> set[str]:
    out: set[str] = set()
    try:
        for fd in (PROC / str(pid) / "fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def _tcp_peers(inodes: set[str]) -> list[str]:
    peers: list[str] = []
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = (PROC / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[9] not in inodes or f[3] != "01":  # 01: ESTABLISHED
                continue
            peers.append(str(decode_proc_addr(f[2].split(":")[0], v6)))
    return peers


def decode_proc_addr(hexaddr: str, v6: bool) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp* addresses: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hexaddr)
    fixed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    addr = ipaddress.ip_address(fixed) if v6 else ipaddress.IPv4Address(fixed)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def ssh_client_addresses(pid: int | None = None) -> list[str]:
    """Addresses of the SSH client(s) this process runs under (empty outside SSH)."""
    if os.environ.get("TM4_NO_SSH_PROTECT") == "1":
        return []
    found: list[str] = []
    for p in ancestors(pid):
        client = _environ_client(p)
        if client and client not in found:
            found.append(client)
            return found
    for p in ancestors(pid):
        try:
            comm = (PROC / str(p) / "comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("sshd"):
            found.extend(a for a in _tcp_peers(_socket_inodes(p)) if a not in found)
            if found:
                return found
    return found


def check_apply_lockout(core: Core) -> None:
    """Refuse a full apply that would stop this SSH client from opening new ssh connections."""
    from tm4.core.errors import LockoutError
    from tm4.core.rules import admits

    now = core.clock()
    entries, bans = core.entries(), core.bans()
    for client in core.protected_sources():
        addr = client.network_address
        if not admits(entries, bans, core.config, now, addr, "ssh"):
            raise LockoutError(
                f"this rule set would shut your own SSH session from {addr} out of ssh; "
                f"`tm4 add admin-ssh {addr} --service ssh` first, or use --force"
            )
