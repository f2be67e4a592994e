"""Benchmark: 1,000 DNS names refreshed against a local DNS server (target <= 2 s).

dnsmasq (Debian's dnsmasq-base) answers on a private loopback address from a
hosts file; tm4's refresher resolves every name (A + AAAA, concurrently), and
writes the answers through Core.set_resolved into the store and, as root, into
nftables inside a private network namespace (never the host's rule set).

    .venv/bin/python bench/dns_refresh.py [--names 1000] [--no-kernel]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dnsserver import DnsServer, dnsmasq_binary  # noqa: E402

from tm4.core.config import parse_config  # noqa: E402
from tm4.core.rules import Ruleset, SetChanges  # noqa: E402
from tm4.dns.lookup import DnsResolver, DnsSettings  # noqa: E402
from tm4.dns.refresher import Refresher  # noqa: E402
from tm4.ops.engine import Core  # noqa: E402

TARGET = 2.0


class NullBackend:
    """Without root: everything but the kernel."""

    def apply(self, ruleset: Ruleset, now: object = None) -> None:
        pass

    def apply_changes(self, changes: SetChanges, now: object = None) -> None:
        pass

    def present(self) -> bool:
        return True

    def listing(self, terse: bool = False) -> str | None:
        return ""

    def remove(self) -> None:
        pass


V4_POOL = [f"{net}.{h}" for net in ("192.0.2", "198.51.100", "203.0.113") for h in range(1, 251)]


def records(n: int, gen: int, changed: set[int] | None = None) -> dict[str, list[str]]:
    """Every name its own addresses (no two entries share one), a different address in
    each generation: names below 750 have one IPv4 address from the documentation
    ranges (rotated through the pool), every 4th of them and all others one IPv6."""
    out = {}
    for i in range(n):
        addrs = []
        g = 0 if changed is not None and i not in changed else gen
        if i < len(V4_POOL):
            if changed is None or g == 0:
                addrs.append(V4_POOL[(i + 7 * g) % len(V4_POOL)])
            else:  # the pool has no spare IPv4 addresses: a changed one moves to IPv6
                addrs.append(f"2001:db8:ff{g:x}::{i:x}")
        if i % 4 == 0 or i >= len(V4_POOL):
            addrs.append(f"2001:db8:{g:x}::{i:x}")
        out[f"n{i:04d}.bench.test"] = addrs
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--no-kernel", action="store_true", help="skip nftables even as root")
    args = ap.parse_args()
    if dnsmasq_binary() is None:
        print("dns_refresh: needs dnsmasq (apt-get install dnsmasq-base)", file=sys.stderr)
        return 2
    n = args.names
    kernel = os.geteuid() == 0 and not args.no_kernel
    lab = None
    with tempfile.TemporaryDirectory(prefix="tm4bench") as tmp, DnsServer(Path(tmp) / "dns", ttl=60) as dns:
        dns.set(records(n, 0))
        raw: dict[str, object] = {"state_dir": str(Path(tmp) / "state"),
                                  "dns": {"nameservers": [dns.nameserver], "timeout": "2s"}}
        if kernel:
            from netlab import Lab

            lab = Lab(tag="bench")
            raw["firewall"] = {"netns": lab.pbx.ns}
        try:
            cfg = parse_config(raw)
            core = Core(cfg, protect=[], backend=None if kernel else NullBackend())  # type: ignore[arg-type]
            with core.store.transaction():
                for i in range(n):
                    core.allow(f"n{i:04d}", [f"n{i:04d}.bench.test"], ["sip-udp"])
            core.apply()
            settings = DnsSettings.from_config(cfg.dns)

            async def resolve_only() -> float:
                r = DnsResolver(settings)
                t = time.perf_counter()
                lks = await asyncio.gather(*(r.lookup(f"n{i:04d}.bench.test") for i in range(n)))
                took = time.perf_counter() - t
                bad = [lk for lk in lks if not lk.ok]
                assert not bad, bad[:3]
                return took

            async def refresh() -> tuple[float, int]:
                t = time.perf_counter()
                res = await Refresher(core, settings=settings).refresh()
                took = time.perf_counter() - t
                assert len(res) == n and not [r for r in res if r.status == "failed"]
                return took, sum(r.changed for r in res)

            where = f"nftables in netns {lab.pbx.ns}" if lab else "no kernel (not root or --no-kernel)"
            print(f"dns_refresh: {n} names (750 A + 250 AAAA-only, every 4th A name also AAAA) against dnsmasq {dns.nameserver}; {where}")
            res_t = [asyncio.run(resolve_only()) for _ in range(3)]
            print(f"  resolve only (2 queries per name, concurrent): "
                  f"median {statistics.median(res_t):.3f} s of {', '.join(f'{x:.3f}' for x in res_t)}")
            first, ch1 = asyncio.run(refresh())
            print(f"  first refresh (every name new, {ch1} entries changed): {first:.3f} s")
            steady = [asyncio.run(refresh()) for _ in range(3)]
            print(f"  steady refresh (no change): median {statistics.median(t for t, _ in steady):.3f} s "
                  f"of {', '.join(f'{t:.3f}' for t, _ in steady)}")
            dns.set(records(n, 1, changed=set(range(0, n, 10))))
            tenth, ch2 = asyncio.run(refresh())
            print(f"  refresh with 10% of the answers changed ({ch2} entries): {tenth:.3f} s")
            dns.set(records(n, 2))
            every, ch3 = asyncio.run(refresh())
            print(f"  refresh with every answer changed ({ch3} entries): {every:.3f} s")
            if kernel:
                e4 = core.backend.set_elements("wl4_sip_udp")  # type: ignore[attr-defined]
                e6 = core.backend.set_elements("wl6_sip_udp")  # type: ignore[attr-defined]
                print(f"  kernel sets afterwards: wl4_sip_udp {len(e4 or [])} elements, "
                      f"wl6_sip_udp {len(e6 or [])}")
            worst = max(first, every, max(t for t, _ in steady), tenth)
            verdict = "OK" if worst <= TARGET else "OVER TARGET"
            print(f"  worst full refresh {worst:.3f} s; target <= {TARGET:.1f} s: {verdict}")
            return 0 if worst <= TARGET else 1
        finally:
            if lab is not None:
                lab.close()


if __name__ == "__main__":
    sys.exit(main())
