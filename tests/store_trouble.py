"""Store trouble for tests: rows an older tm4 could have written, and a disk that fills up."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tm4.core.store import range_key

T0 = "2026-01-02T03:04:05Z"  # a whole-second time as tm4 before 0.x wrote it


def poison(db: Path) -> None:
    """Rows an older tm4 could write, straight into SQLite (no tm4 code involved)."""
    c = sqlite3.connect(db)
    for addr in ("224.0.0.1", "239.255.255.250", "255.255.255.255", "ff02::/64"):
        fam, lo, hi = range_key(ipaddress.ip_network(addr))
        c.execute("INSERT INTO bans(address, reason, origin, created, expires, offences, family, lo, hi)"
                  " VALUES(?,?,?,?,?,?,?,?,?)", (addr, "old guard", "guard", T0, None, 1, fam, lo, hi))
    c.execute("INSERT INTO bans(address, reason, origin, created, expires, offences, family, lo, hi)"
              " VALUES('192.0.2.66', '', 'martian', ?, NULL, 1, 4, 'zz', 'zz')", (T0,))
    c.execute("INSERT INTO entries(name, sources, services, origin, created) VALUES(?,?,?,?,?)",
              ("mdns", json.dumps(["224.0.0.251"]), json.dumps(["sip-udp"]), "admin", T0))
    c.execute("INSERT INTO entries(name, sources, services, origin, created) VALUES(?,?,?,?,?)",
              ("garbled", "not json", json.dumps(["ssh"]), "admin", T0))
    fam, lo, hi = range_key(ipaddress.ip_network("224.0.0.251/32"))
    c.execute("INSERT INTO entry_nets(name, family, lo, hi) VALUES('mdns', ?, ?, ?)", (fam, lo, hi))
    c.commit()
    c.close()



@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of its own (root), to fill up for real."""
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write into `path` until the file system says no space is left."""
    with contextlib.suppress(OSError), open(path / "filler", "ab", buffering=0) as f:
        while True:
            f.write(b"\0" * 4096)
