"""The store: migrations from old schema versions, audit, and concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import sqlite3
from pathlib import Path

import pytest
from fakes import MemoryKernel

from tm4.core.config import parse_config
from tm4.core.errors import ConflictError, StoreError
from tm4.core.migrations import MIGRATIONS, SCHEMA_VERSION
from tm4.core.model import Origin
from tm4.core.store import Store
from tm4.ops.engine import Core

FIXTURES = Path(__file__).parent.parent / "fixtures"





def make_core(state: Path) -> Core:
    return Core(parse_config({"state_dir": str(state)}), backend=MemoryKernel(), protect=[])  # type: ignore[arg-type]


def test_fresh_store_has_current_schema_and_wal(tmp_path: Path) -> None:
    s = Store(tmp_path / "tm4.db")
    assert s.version == SCHEMA_VERSION
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migrates_a_version_1_store_keeping_its_data(tmp_path: Path) -> None:
    db = tmp_path / "tm4.db"
    shutil.copy(FIXTURES / "store_v1.db", db)
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 1
    s = Store(db)
    assert s.version == SCHEMA_VERSION
    e = s.get_entry("office")
    assert e is not None and [x.text for x in e.sources] == ["192.0.2.0/24"] and e.resolved == {}
    assert s.audit_log()[0].action == "allow"


def test_refuses_a_store_from_a_newer_tm4(tmp_path: Path) -> None:
    db = tmp_path / "tm4.db"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    con.close()
    with pytest.raises(StoreError, match="newer than this tm4"):
        Store(db)


def test_audit_records_who_and_how(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    core.allow("alice", ["192.0.2.7"], ["sip-udp"], origin=Origin.DIALIN, actor="callerid=+15550100")
    core.block("203.0.113.9", reason="ChallengeResponseFailed x5", origin=Origin.GUARD, actor="ami")
    recs = core.store.audit_log()
    assert [(r.action, r.subject, r.origin, r.actor) for r in recs] == [
        ("allow", "alice", "dialin", "callerid=+15550100"),
        ("block", "203.0.113.9", "guard", "ami"),
    ]
    assert recs[1].detail["reason"] == "ChallengeResponseFailed x5"


def test_duplicate_name_refused_unless_replace(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    core.allow("alice", ["192.0.2.7"], ["sip-udp"])
    with pytest.raises(ConflictError, match="--replace"):
        core.allow("alice", ["192.0.2.8"], ["sip-udp"])
    core.allow("alice", ["192.0.2.8"], ["sip-udp"], replace=True)
    assert core.get_entry("alice").sources[0].text == "192.0.2.8"


def test_an_expired_entry_does_not_block_its_name(tmp_path: Path) -> None:
    from datetime import timedelta

    core = make_core(tmp_path)
    core.allow("bob", ["192.0.2.7"], ["ssh"], ttl=timedelta(seconds=1))
    later = core.clock() + timedelta(seconds=5)
    core.clock = lambda: later
    core.allow("bob", ["192.0.2.8"], ["ssh"])  # no --replace needed
    assert core.get_entry("bob").sources[0].text == "192.0.2.8"


def test_grant_lifts_ban_and_ban_of_whitelisted_is_refused(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    core.block("192.0.2.7")
    core.allow("alice", ["192.0.2.7"], ["sip-udp"])
    assert core.bans() == []
    with pytest.raises(ConflictError, match="whitelisted"):
        core.block("192.0.2.0/24")


def _writer(state: str, worker: int, n: int) -> None:  # runs in a spawned process
    core = make_core(Path(state))
    for i in range(n):
        core.allow(f"w{worker}-{i}", [f"198.51.{100 + worker}.{i + 1}"], ["sip-udp"])
        core.block(f"203.0.{worker}.{i + 1}", reason=f"w{worker}")


def test_concurrent_writers_in_several_processes_lose_nothing(tmp_path: Path) -> None:
    make_core(tmp_path).store.close()  # create the schema once
    workers, n = 6, 40
    # spawn, not fork: separate programs, like CLI runs, the daemon and the AGI script
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, n)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    core = make_core(tmp_path)
    assert len(core.entries()) == workers * n
    assert len(core.bans()) == workers * n
    assert len(core.store.audit_log(limit=10_000)) == 2 * workers * n


def test_v1_fixture_is_what_migration_1_makes(tmp_path: Path) -> None:
    # guards against someone editing a released migration
    con = sqlite3.connect(FIXTURES / "store_v1.db")
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"entries", "bans", "audit", "meta", "entry_nets"} <= tables
    assert len(MIGRATIONS) >= 2
