"""What checking tm4.toml against its schema costs: the import of msgspec and of the
config module (paid by every `tm4` verb and tm4d, never by the classic AGI), reading the
shipped example, and `tm4d --check-config` as an admin runs it.

    .venv/bin/python bench/config_check.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "etc" / "tm4.toml.example"


def import_ms(module: str, runs: int = 9) -> float:
    """Median wall time of `import module` in a fresh interpreter, minus the interpreter."""
    def once(code: str) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return (time.perf_counter() - t) * 1000

    base = statistics.median(once("pass") for _ in range(runs))
    return statistics.median(once(f"import {module}") for _ in range(runs)) - base


def main() -> None:
    for module in ("msgspec", "tomllib", "tm4.core.config"):
        print(f"import {module:16} {import_ms(module):6.1f} ms (median of 9 fresh interpreters)")
    import tomllib

    from tm4.core.config import load_config, parse_config

    data = tomllib.loads(EXAMPLE.read_text())
    t = time.perf_counter()
    parse_config(data)
    first = (time.perf_counter() - t) * 1000
    n = 500
    t = time.perf_counter()
    for _ in range(n):
        parse_config(data)
    print(f"parse the example: first {first:.2f} ms, then {(time.perf_counter() - t) / n * 1000:.3f} ms")
    t = time.perf_counter()
    for _ in range(100):
        load_config(EXAMPLE)
    print(f"load_config(example) incl. TOML: {(time.perf_counter() - t) * 10:.3f} ms")
    tm4d = str(Path(sys.executable).parent / "tm4d")
    walls = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([tm4d, "--check-config", "--config", str(EXAMPLE)], check=True, capture_output=True)
        walls.append((time.perf_counter() - t) * 1000)
    print(f"tm4d --check-config (whole process): median {statistics.median(walls):.0f} ms")


if __name__ == "__main__":
    main()
