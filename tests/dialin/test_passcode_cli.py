"""tm4 passcode add|list|del|rotate through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tm4.cli import cli
from tm4.core.config import load_config
from tm4.core.errors import Tm4Error
from tm4.core.store import Store
from tm4.dialin.passcodes import PasscodeBook


@pytest.fixture
def tm4_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cfg = tmp_path / "tm4.toml"
    # a namespace that does not exist: kernel calls fail, these tests stay store-only
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n[firewall]\nnetns = "tm4-cli-test-none"\n')
    monkeypatch.setenv("TM4_NFT_SUBPROCESS", "1")
    return cfg


def _run(cfg: Path, *args: str, input: str | None = None) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, ["--config", str(cfg), "passcode", *args], input=input)
    if r.exception and not isinstance(r.exception, SystemExit | Tm4Error):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def _book(cfg: Path) -> PasscodeBook:
    c = load_config(cfg)
    return PasscodeBook.open(Store(c.store_path), c.state_dir)


def test_add_shows_the_passcode_once(tm4_config: Path) -> None:
    rc, out, err = _run(tm4_config, "add", "alice", "-s", "sip-udp,sip-tcp", "--ttl", "8h", "--keep", "2")
    assert rc == 0
    code = out.strip().rsplit(" ", 1)[1]
    assert out.startswith("new passcode for alice: ") and code.isdigit() and len(code) == 8
    assert "shown once" in err
    rc, listing, _ = _run(tm4_config, "list")
    assert "alice" in listing and code not in listing and "8h" in listing
    rc, js, _ = _run(tm4_config, "list", "--json")
    data = json.loads(js)
    assert data == [{"owner": "alice", "entry": "dialin-alice", "services": ["sip-udp", "sip-tcp"],
                     "ttl": "8h", "keep": 2, "created": data[0]["created"], "last_used": None, "endpoints": []}]
    assert _book(tm4_config).verify(code).owner == "alice"  # type: ignore[union-attr]


def test_passcode_from_stdin_and_json(tm4_config: Path) -> None:
    rc, out, _ = _run(tm4_config, "add", "bob", "--passcode-stdin", "--json", input="31415926\n")
    assert rc == 0 and json.loads(out)["passcode"] == "31415926"
    rc, _, _ = _run(tm4_config, "add", "carol", "--passcode-stdin", input="12345\n")
    assert rc != 0
    rc, _, _ = _run(tm4_config, "add", "dave", "--passcode-stdin", input="31415926\n")
    assert rc != 0, "passcodes are unique"


def test_bad_service_and_owner_are_refused(tm4_config: Path) -> None:
    assert _run(tm4_config, "add", "alice", "-s", "nonsense")[0] != 0
    assert _run(tm4_config, "add", "Not Valid")[0] != 0
    assert _run(tm4_config, "add", "alice", "--length", "5")[0] != 0
    assert json.loads(_run(tm4_config, "list", "--json")[1]) == []


def test_rotate_and_delete(tm4_config: Path) -> None:
    _, out, _ = _run(tm4_config, "add", "alice")
    old = out.strip().rsplit(" ", 1)[1]
    rc, out, _ = _run(tm4_config, "rotate", "alice", "--length", "10")
    new = out.strip().rsplit(" ", 1)[1]
    assert rc == 0 and len(new) == 10
    book = _book(tm4_config)
    assert book.verify(old) is None and book.verify(new) is not None
    rc, out, _ = _run(tm4_config, "del", "alice")
    assert rc == 0 and "deleted" in out
    assert _run(tm4_config, "del", "alice")[0] != 0
    assert _run(tm4_config, "rotate", "alice")[0] != 0
    audit = [r.action for r in Store(load_config(tm4_config).store_path).audit_log()]
    assert audit == ["passcode-add", "passcode-rotate", "passcode-del"]


def _dialin_entry(cfg: Path, owner: str) -> None:
    from tm4.core.model import Origin
    from tm4.ops.engine import Core

    Core(load_config(cfg), protect=[]).allow(f"dialin-{owner}", ["203.0.113.7"], ["sip-udp"],
                                             origin=Origin.DIALIN)


def test_delete_revokes_the_grant_unless_kept(tm4_config: Path) -> None:
    for owner in ("alice", "bob"):
        _run(tm4_config, "add", owner)
        _dialin_entry(tm4_config, owner)
    rc, out, _ = _run(tm4_config, "del", "alice")
    assert rc == 0 and "revoked dialin-alice (203.0.113.7)" in out
    rc, out, _ = _run(tm4_config, "del", "bob", "--keep-grant")
    assert rc == 0 and "revoked" not in out
    names = {e.name for e in Store(load_config(tm4_config).store_path).entries()}
    assert names == {"dialin-bob"}
