"""Spine benchmarks: full apply of 10,000 entries + 100,000 bans, incremental grant/ban,
and packet throughput through the table with 10 and with 100,000 bans.

Runs in its own network namespaces (needs root); prints one line per figure.
Targets (issue 2): full apply <= 1 s, incremental <= 5 ms, throughput flat.
"""

from __future__ import annotations

import ipaddress
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netlab import Lab  # noqa: E402

from tm4.core.config import parse_config  # noqa: E402
from tm4.core.model import Ban, Entry, Origin, Source, utcnow  # noqa: E402
from tm4.ops.engine import Core  # noqa: E402

N_ENTRIES = 10_000
N_BANS = 100_000


def fill(core: Core, n_entries: int, n_bans: int) -> None:
    now = utcnow()
    base_e = int(ipaddress.IPv4Address("10.0.0.0"))
    base_b = int(ipaddress.IPv4Address("100.64.0.0"))
    with core.store.transaction():
        for i in range(n_entries):
            addr = ipaddress.IPv4Address(base_e + i * 4)
            core.store.put_entry(Entry(f"e{i}", (Source.parse(str(addr)),), ("sip-udp", "sip-tcp"),
                                       Origin.ADMIN, now, now + timedelta(days=1) if i % 2 else None))
        for i in range(n_bans):
            addr = ipaddress.IPv4Address(base_b + i * 2)
            core.store.put_ban(Ban(ipaddress.ip_network(addr), "bench", Origin.GUARD, now,
                                   now + timedelta(hours=1)))


def throughput(lab: Lab, client, rounds: int = 3) -> float:  # type: ignore[no-untyped-def]
    """Best of `rounds`: UDP packets per second that iperf3 pushes from the client
    through the table (every packet is checked against the ban sets first)."""
    return max(_throughput(lab, client) for _ in range(rounds))


def _throughput(lab: Lab, client, seconds: int = 2) -> float:  # type: ignore[no-untyped-def]
    server = lab.pbx.popen("iperf3", "-s", "-1", "-p", "10001", stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = client.run("iperf3", "-c", "192.0.2.1", "-p", "10001", "-u", "-b", "0", "-l", "64",
                         "-t", str(seconds), "-J", check=False).stdout
        data = json.loads(out)
        summary = data["end"].get("sum_received") or data["end"]["sum"]
        return float(summary["packets"]) / float(summary["seconds"])
    finally:
        server.kill()
        server.wait()


def main() -> None:
    lab = Lab("b")
    try:
        client = lab.client("c", ["192.0.2.10/24"])
        tmp = tempfile.mkdtemp()
        core = Core(parse_config({"state_dir": tmp, "firewall": {"netns": lab.pbx.ns}}), protect=[])
        fill(core, 10, 10)
        core.allow("bench-client", ["192.0.2.10"], ["all"])  # iperf3's TCP control connection
        core.apply()
        tp_small = throughput(lab, client)
        fill(core, N_ENTRIES, N_BANS)
        t0 = time.perf_counter()
        rs = core.render()
        t1 = time.perf_counter()
        core.apply(rs)
        t2 = time.perf_counter()
        n_elem = sum(len(s.elements) for s in rs.sets.values())
        print(f"full apply, {N_ENTRIES} entries + {N_BANS} bans ({n_elem} set elements): "
              f"{t2 - t0:.3f} s (render {t1 - t0:.3f} s, kernel {t2 - t1:.3f} s)  target <= 1 s")
        # interleave small and big tables so machine load hits both alike
        small = Core(parse_config({"state_dir": tempfile.mkdtemp(), "firewall": {"netns": lab.pbx.ns}}),
                     protect=[])
        fill(small, 10, 10)
        small.allow("bench-client", ["192.0.2.10"], ["all"])
        tps_small, tps_big = [tp_small], []
        for _ in range(2):
            core.apply()
            tps_big.append(throughput(lab, client, rounds=1))
            small.apply()
            tps_small.append(throughput(lab, client, rounds=1))
        core.apply()
        tp_small, tp_big = max(tps_small), max(tps_big)
        grants, bans = [], []
        for i in range(50):
            t = time.perf_counter()
            core.allow(f"inc{i}", [f"198.51.100.{i + 1}"], ["sip-udp"], ttl=timedelta(hours=1))
            grants.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            core.block(f"203.0.113.{i + 1}", ttl=timedelta(hours=1), reason="bench")
            bans.append((time.perf_counter() - t) * 1000)
        for name, xs in (("one grant", grants), ("one ban", bans)):
            xs.sort()
            print(f"incremental {name} (store + kernel, table holds {n_elem} elements): "
                  f"p50 {statistics.median(xs):.2f} ms, p99 {xs[int(len(xs) * 0.99) - 1]:.2f} ms"
                  "  target <= 5 ms")
        print(f"throughput (iperf3, 64-byte UDP through the table): {tp_small:.0f} pkt/s with 10 bans, "
              f"{tp_big:.0f} pkt/s with {N_BANS} bans ({tp_big / tp_small * 100:.0f}%)")
    finally:
        lab.close()


if __name__ == "__main__":
    main()
