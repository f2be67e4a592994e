"""`tm4d --check-config` as an admin runs it: every broken file in tests/fixtures/configs is
refused in one line that names the file and the key, never with a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
BROKEN = sorted(FIXTURES.glob("*.toml"))
ROOT = Path(__file__).resolve().parents[2]


def tm4d() -> str:
    found = Path(sys.executable).parent / "tm4d"
    return str(found) if found.exists() else shutil.which("tm4d") or "tm4d"


def check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tm4d(), "--check-config", "--config", str(path)], capture_output=True,
                          text=True, timeout=60, env=env, cwd="/")


def expected(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), f"{path.name}: first line must say what is expected"
    return first.removeprefix("# expect: ")


def test_there_are_enough_broken_configs() -> None:
    assert len(BROKEN) >= 24


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_config_is_refused_naming_file_and_key(path: Path) -> None:
    res = check(path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert lines[0].startswith(f"tm4d: {path}: "), lines[0]
    assert expected(path) in lines[0], lines[0]


def test_the_shipped_example_and_an_empty_file_are_valid(tmp_path: Path) -> None:
    example = ROOT / "etc" / "tm4.toml.example"
    res = check(example)
    assert res.returncode == 0 and res.stdout == f"tm4d: config {example} is valid\n", res.stderr
    empty = tmp_path / "tm4.toml"
    empty.write_text("")
    assert check(empty).returncode == 0


def test_every_key_uncommented_with_its_default_is_valid(tmp_path: Path) -> None:
    """The example with each `#key = default` line made real: the defaults pass their own schema."""
    lines = (ROOT / "etc" / "tm4.toml.example").read_text().splitlines()
    real = [ln[1:] if ln.startswith("#") and " = " in ln and not ln.startswith(("#[", "# ", "#ports"))
            else ln for ln in lines]
    f = tmp_path / "tm4.toml"
    f.write_text("\n".join(real) + "\n")
    res = check(f)
    assert res.returncode == 0, res.stderr


def test_a_missing_or_unreadable_file_is_one_line(tmp_path: Path) -> None:
    res = check(tmp_path / "nope.toml")
    assert res.returncode == 1 and res.stderr == f"tm4d: config file {tmp_path / 'nope.toml'} does not exist\n"
    res = check(tmp_path)  # a directory
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr


def test_the_same_refusal_stops_the_cli(tmp_path: Path) -> None:
    """`tm4` reads the file with the same code: same words, exit 1, one line."""
    res = subprocess.run([str(Path(tm4d()).with_name("tm4")), "--config", str(FIXTURES / "ami_port_70000.toml"),
                          "bans"], capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 1
    assert res.stderr.splitlines() == [f"tm4: {FIXTURES / 'ami_port_70000.toml'}: [ami] port: must be at most "
                                       "65535, got 70000"]
