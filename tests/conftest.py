"""Shared fixtures: isolated tm4 instances, and network namespaces for root tests."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from netlab import Lab  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
IS_ROOT = os.geteuid() == 0
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

os.environ.setdefault("TM4_NO_SSH_PROTECT", "1")


def need_root_tools(*tools: str) -> None:
    """Skip (outside CI) or fail (in CI) when root or a program is missing."""
    missing = [] if IS_ROOT else ["root"]
    missing += [t for t in tools if shutil.which(t) is None]
    if missing:
        reason = f"needs {', '.join(missing)}"
        if IN_CI:
            pytest.fail(f"{reason}; CI must run every test (run `make deps` as root)")
        pytest.skip(reason)


def real_asterisk() -> str:
    """The real Asterisk binary named by TM4_ASTERISK. Asterisk is in neither Debian 12 nor
    PyPI, so without it these tests skip, even in CI (the one kind of test that may)."""
    path = os.environ.get("TM4_ASTERISK", "")
    if not path:
        pytest.skip("TM4_ASTERISK does not name an Asterisk binary")
    if not os.access(path, os.X_OK):
        pytest.fail(f"TM4_ASTERISK={path} is not an executable")
    return path


@pytest.fixture
def lab() -> Iterator[Lab]:
    need_root_tools("ip", "nft")
    lb = Lab()
    try:
        yield lb
    finally:
        lb.close()


@pytest.fixture
def tm4_config(tmp_path: Path) -> Path:
    """A config file for an isolated tm4 instance with its own state dir."""
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    return cfg


@pytest.fixture
def tm4d(lab: Lab, tmp_path: Path) -> Iterator[object]:
    """A real tm4d inside the lab's PBX namespace (see daemon_support.Tm4d)."""
    from daemon_support import Tm4d

    d = Tm4d(tmp_path, lab.pbx.ns)
    try:
        yield d
    finally:
        d.close()
