"""The real CLI and tm4d on a store an older tm4 poisoned, and on a completely full disk:
every verb answers, tm4d and `tm4d --boot` start, writes fail in one line."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import Tm4d
from netlab import Lab
from store_trouble import fill, poison, small_tmpfs

from tm4.core.errors import NeverSourceError

NS: list[str] = []  # the namespace the CLI runs in (as tm4d does): never the host's kernel


def tm4(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TM4_NO_SSH_PROTECT="1")
    return subprocess.run(["ip", "netns", "exec", NS[-1], sys.executable, "-m", "tm4.cli", "--config", str(cfg),
                           *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(autouse=True)
def _cli_namespace(lab: Lab) -> Iterator[None]:
    NS.append(lab.pbx.ns)
    yield
    NS.pop()


def ok(cfg: Path, *args: str) -> str:
    p = tm4(cfg, *args)
    assert p.returncode == 0, f"tm4 {' '.join(args)}: {p.stderr}"
    assert "Traceback" not in p.stderr
    return p.stdout


def boot(lab: Lab, cfg: Path) -> subprocess.CompletedProcess[str]:
    return lab.pbx.run(sys.executable, "-m", "tm4.daemon", "--boot", "--config", str(cfg), check=False,
                       env=dict(os.environ, TM4_NO_SSH_PROTECT="1"))


def set_text(lab: Lab, name: str) -> str:
    return lab.pbx.run("nft", "list", "set", "inet", "tm4", name).stdout


def test_a_poisoned_store_never_takes_tm4_down(lab: Lab, tmp_path: Path) -> None:
    d = Tm4d(tmp_path, lab.pbx.ns)
    cfg = d.config_path
    try:
        ok(cfg, "add", "office", "192.0.2.0/24", "-s", "sip-udp")
        ok(cfg, "block", "203.0.113.9")
        poison(d.state / "tm4.db")
        # tm4d starts, applies, and answers
        d.start()
        assert "store_rows_quarantined count=7" in d.log()
        assert "192.0.2.0/24" in d.nft("list", "set", "inet", "tm4", "wl4n_sip_udp")
        assert [b["address"] for b in d.call("bans")] == ["203.0.113.9"]
        assert len(d.call("quarantine")) == 7
        for addr in ("239.255.255.250", "ff02::/64"):  # the control socket meets the same rule
            with pytest.raises(NeverSourceError, match="never be the source"):
                d.call("block", address=addr, force=True)
        assert len(d.call("bans")) == 1 and d.alive()
        d.stop()
        poison(d.state / "tm4.db")  # again: now `tm4d --boot` meets them first
        p = boot(lab, cfg)
        assert p.returncode == 0, p.stderr
        assert "store_rows_quarantined" in p.stderr
        assert "203.0.113.9" in set_text(lab, "ban4")
        poison(d.state / "tm4.db")  # and once more for the CLI alone
        bans = tm4(cfg, "bans")
        assert bans.returncode == 0 and "203.0.113.9" in bans.stdout
        assert "set aside" in bans.stderr and "tm4 quarantine list" in bans.stderr
        status = ok(cfg, "status")
        assert "quarantine: 21 row(s)" in status  # three poisonings, 7 rows each
        st = json.loads(ok(cfg, "status", "--json"))
        assert st["quarantined"] == 21 and st["bans"] == 1
        ok(cfg, "list")
        ok(cfg, "log")
        ok(cfg, "sweep")
        ok(cfg, "apply")
        ok(cfg, "block", "198.51.100.7")
        ok(cfg, "unblock", "203.0.113.9")
        ok(cfg, "del", "office")
        ok(cfg, "plan")
        rows = json.loads(ok(cfg, "quarantine", "list", "--json"))
        assert {r["key"] for r in rows} >= {"224.0.0.1", "ff02::/64", "mdns"}
        assert all(r["reason"] and r["row"] for r in rows)
        assert "multicast" in ok(cfg, "quarantine", "list")
        gone = tm4(cfg, "unblock", "224.0.0.1")
        assert gone.returncode == 1 and gone.stderr.count("\n") == 1 and "tm4 quarantine list" in gone.stderr
        one = next(r["id"] for r in rows if r["key"] == "224.0.0.1")
        assert ok(cfg, "quarantine", "drop", str(one)).strip() == "dropped 1 quarantined row(s)"
        bad = tm4(cfg, "quarantine", "drop", str(one))
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no quarantined row" in bad.stderr
        ok(cfg, "quarantine", "drop", "--all")
        assert "quarantine is empty" in ok(cfg, "quarantine", "list")
        assert "quarantine" not in ok(cfg, "status")
        # the new rule refuses the same bans from the CLI, in one line
        for addr in ("224.0.0.1", "255.255.255.255", "ff02::1"):
            p = tm4(cfg, "block", addr)
            assert p.returncode == 1 and p.stderr.count("\n") == 1 and "never be the source" in p.stderr
    finally:
        d.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small") as mnt:
        yield mnt


def test_on_a_full_disk_reading_verbs_answer_and_writing_verbs_say_so(lab: Lab, tmp_path: Path,
                                                                      small_disk: Path) -> None:
    state = small_disk / "state"
    cfg = tmp_path / "tm4.toml"
    sock = tmp_path / "none.sock"
    cfg.write_text(f'state_dir = "{state}"\n[firewall]\nnetns = "{lab.pbx.ns}"\n'
                   f'[daemon]\nsocket = "{sock}"\n')
    ok(cfg, "add", "office", "192.0.2.0/24", "-s", "sip-udp")
    ok(cfg, "block", "203.0.113.9")
    ok(cfg, "apply")
    before = lab.pbx.run("nft", "list", "table", "inet", "tm4").stdout
    fill(small_disk)
    assert "office" in ok(cfg, "list")
    assert "203.0.113.9" in ok(cfg, "bans")
    assert "loaded" in ok(cfg, "status")
    assert "block" in ok(cfg, "log")
    assert json.loads(ok(cfg, "list", "--json"))[0]["name"] == "office"
    for verb in (["add", "phone", "198.51.100.7", "-s", "sip-udp"], ["block", "198.51.100.99"],
                 ["unblock", "203.0.113.9"], ["del", "office"]):
        p = tm4(cfg, *verb)
        assert p.returncode == 1, (verb, p.stdout)
        assert p.stderr == f"tm4: no space left on {state}\n", (verb, p.stderr)
    assert lab.pbx.run("nft", "list", "table", "inet", "tm4").stdout == before
    p = boot(lab, cfg)
    assert p.returncode == 0, p.stderr  # the rules still load at boot
    with contextlib.suppress(FileNotFoundError):
        (small_disk / "filler").unlink()
    ok(cfg, "add", "phone", "198.51.100.7", "-s", "sip-udp")
