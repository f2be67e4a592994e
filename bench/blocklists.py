"""Blocklist costs: parsing a fetched list, and rendering its sets (first and cached).

Prints one line per figure. 50,000 single addresses is about the size of VoIPBL's list.
Run: .venv/bin/python bench/blocklists.py [COUNT]
"""

from __future__ import annotations

import ipaddress
import random
import sys
import tempfile
import time

from tm4.core.config import parse_config
from tm4.core.model import Entry, Source
from tm4.core.store import Store
from tm4.sources import blocklists as bl


def main(count: int = 50_000) -> None:
    rng = random.Random(1)
    nets = {ipaddress.ip_network(f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}."
                                 f"{rng.randint(0, 255)}") for _ in range(count)}
    text = "\n".join(str(n) for n in nets).encode()
    t = time.perf_counter()
    parsed = bl.parse_list(text)
    print(f"parse {len(parsed.nets)} lines: {time.perf_counter() - t:.2f} s")
    with tempfile.TemporaryDirectory() as d:
        cfg = parse_config({"state_dir": d})
        store = Store(cfg.store_path)
        for i in range(100):  # a whitelist to carve out
            store.put_entry(Entry(f"e{i}", (Source.parse(str(parsed.nets[i * 7])),), ("sip-udp",)))
        bl._put(store, bl.Blocklist("voipbl", "/x", nets=parsed.nets))
        t = time.perf_counter()
        rs = bl.ruleset_extra(cfg, store)
        first = time.perf_counter() - t
        t = time.perf_counter()
        bl.ruleset_extra(cfg, store)
        again = time.perf_counter() - t
        assert rs is not None
        n = len(rs.sets[bl.set_name("voipbl", 4)].elements)
        print(f"render {n} elements (100 whitelisted carved out): first {first:.2f} s, cached {again:.3f} s")
        store.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)
