"""The tm4 CLI through click's CliRunner, with a store of its own and no kernel."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tm4.cli import cli


def store_only_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """`invoke(*args)`: tm4 with a tm4.toml in tmp_path whose namespace does not exist."""
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n[firewall]\nnetns = "tm4-test-none"\n')
    monkeypatch.setenv("TM4_NFT_SUBPROCESS", "1")  # the namespace does not exist: store only

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--config", str(cfg), *args])
    return invoke
