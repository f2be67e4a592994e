"""What older versions, full disks and failed commits leave behind never takes tm4 down:
rows that no longer parse are quarantined; a commit that fails takes the kernel change back."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import need_root_tools
from fakes import MemoryKernel
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from store_trouble import T0, fill, poison, small_tmpfs

from tm4.core.config import parse_config
from tm4.core.errors import ApplyError, StoreError
from tm4.core.model import Origin, format_time, never_source_reason, parse_time, utcnow
from tm4.core.store import Store
from tm4.ops.engine import Core


def markers(state: Path) -> dict[int, bytes]:
    """pid -> state byte of every kernel-change marker next to the store."""
    return {int(m.name.rsplit("-", 1)[1]): m.read_bytes() for m in state.glob("tm4.db.kernel-*")}


def make_core(state: Path, backend: Any = None) -> Core:
    return Core(parse_config({"state_dir": str(state)}), backend=backend or MemoryKernel(), protect=[])  # type: ignore[arg-type]


def test_rows_that_no_longer_parse_are_quarantined_once_and_logged(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    core = make_core(tmp_path / "state")
    core.block("203.0.113.9", reason="kept")
    core.allow("office", ["192.0.2.0/24"], ["sip-udp"])
    poison(core.store.path)
    caplog.set_level(logging.ERROR, "tm4.store")
    assert [b.address for b in core.bans()] == ["203.0.113.9"]
    assert [e.name for e in core.entries()] == ["office"]
    q = core.store.quarantined()
    assert sorted(r.key for r in q) == sorted(["224.0.0.1", "239.255.255.250", "255.255.255.255",
                                               "ff02::/64", "192.0.2.66", "mdns", "garbled"])
    byk = {r.key: r for r in q}
    assert "multicast" in byk["224.0.0.1"].reason and byk["224.0.0.1"].table == "bans"
    assert byk["224.0.0.1"].row["reason"] == "old guard"  # the whole row is kept, as JSON
    assert "martian" in byk["192.0.2.66"].reason and byk["garbled"].table == "entries"
    assert len([r for r in caplog.records if "row_quarantined" in r.getMessage()]) == 7
    # moved, not copied: the tables no longer hold them (entry_nets follow their entry)
    raw = sqlite3.connect(core.store.path)
    assert raw.execute("SELECT count(*) FROM bans").fetchone()[0] == 1
    assert raw.execute("SELECT count(*) FROM entry_nets WHERE name = 'mdns'").fetchone()[0] == 0
    caplog.clear()
    core.bans()
    assert not caplog.records and len(core.store.quarantined()) == 7
    assert core.store.drop_quarantined([byk["mdns"].id]) == 1
    assert core.store.drop_quarantined(None) == 6 and core.store.quarantined() == []


def test_every_core_operation_works_on_a_poisoned_store(tmp_path: Path) -> None:
    core = make_core(tmp_path / "state")
    core.block("203.0.113.9")
    poison(core.store.path)
    core.apply()  # the renderer reads raw columns: skips what does not parse
    core.block("198.51.100.7", ttl=timedelta(hours=1))
    core.unblock("203.0.113.9")
    core.allow("office", ["192.0.2.0/24"], ["sip-udp"])
    core.sweep()
    core.apply()
    assert {b.address for b in core.bans()} == {"198.51.100.7"}
    assert core.backend.addresses() >= {"198.51.100.7", "192.0.2.0/24"}  # type: ignore[attr-defined]
    assert not {"224.0.0.1", "239.255.255.250", "224.0.0.251"} & core.backend.addresses()  # type: ignore[attr-defined]
    assert len(core.store.quarantined()) == 7


def test_set_items_skips_rows_with_broken_range_columns(tmp_path: Path) -> None:
    store = Store(tmp_path / "tm4.db")
    poison(store.path)
    items = store.set_items(utcnow())
    assert all(isinstance(lo, int) for v in items.values() for lo, _, _ in v)


# -- the commit failing after the kernel change ---------------------------------------

class FailingCommit:
    """The store's connection, with COMMIT failing as SQLite fails it on a full disk."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.strip().upper() == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


@contextlib.contextmanager
def failing_commits(store: Store) -> Iterator[None]:
    real = store._db
    store._db = FailingCommit(real)  # type: ignore[assignment]
    try:
        yield
    finally:
        store._db = real


@pytest.mark.parametrize("op", ["allow", "block", "unblock", "revoke", "replace"])
def test_a_failed_commit_takes_the_kernel_change_back(tmp_path: Path, op: str) -> None:
    kernel = MemoryKernel()
    core = make_core(tmp_path / "state", kernel)
    core.allow("office", ["192.0.2.0/24"], ["sip-udp"])
    core.block("203.0.113.9", ttl=timedelta(hours=1))
    core.apply()
    before, rows = {k: set(v) for k, v in kernel.sets.items()}, core.store.snapshot()
    with failing_commits(core.store), pytest.raises(StoreError) as exc:
        {"allow": lambda: core.allow("phone", ["198.51.100.7"], ["sip-udp"]),
         "block": lambda: core.block("198.51.100.99"),
         "unblock": lambda: core.unblock("203.0.113.9"),
         "revoke": lambda: core.revoke("office"),
         "replace": lambda: core.allow("office", ["192.0.2.128/25"], ["ssh"], replace=True)}[op]()
    assert str(exc.value) == f"no space left on {tmp_path / 'state'}"
    assert kernel.batches and {k: set(v) for k, v in kernel.sets.items() if v} == \
        {k: v for k, v in before.items() if v}
    assert core.store.snapshot() == rows
    assert markers(tmp_path / "state") == {os.getpid(): b"0"}  # settled: nothing to reconcile


class UndoRefusingKernel(MemoryKernel):
    def __init__(self) -> None:
        super().__init__()
        self.refuse = False

    def apply_changes(self, changes: Any, now: datetime | None = None) -> None:
        if self.refuse:
            raise ApplyError("refused")
        super().apply_changes(changes, now)
        self.refuse = bool(self.arm)

    def apply(self, ruleset: Any, now: datetime | None = None) -> None:
        if self.refuse:
            raise ApplyError("refused")
        super().apply(ruleset, now)

    arm = False


def test_an_undo_the_kernel_refuses_leaves_a_mark_the_next_writer_reconciles(tmp_path: Path) -> None:
    kernel = UndoRefusingKernel()
    core = make_core(tmp_path / "state", kernel)
    core.apply()
    kernel.arm = True
    with failing_commits(core.store), pytest.raises(StoreError):
        core.allow("phone", ["198.51.100.7"], ["sip-udp"])
    assert "198.51.100.7" in kernel.addresses()  # the kernel refused to take it back
    assert markers(tmp_path / "state") == {os.getpid(): b"F"}
    kernel.arm = kernel.refuse = False
    core.block("203.0.113.5")  # the next writer, in this very process, reconciles
    assert "198.51.100.7" not in kernel.addresses() and "203.0.113.5" in kernel.addresses()
    assert markers(tmp_path / "state") == {os.getpid(): b"0"}


def test_a_writer_killed_mid_change_is_reconciled_by_the_next_writer(tmp_path: Path) -> None:
    kernel = MemoryKernel()
    core = make_core(tmp_path / "state", kernel)
    core.apply()
    # what a writer killed between its kernel change and its commit leaves: an element
    # without a store row, and its marker (a pid that no longer runs)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "state" / f"tm4.db.kernel-{dead.pid}").write_bytes(b"1")
    kernel.sets.setdefault("wl4_sip-udp", set()).add("198.51.100.7")
    core.block("203.0.113.5")
    assert "198.51.100.7" not in kernel.addresses() and "203.0.113.5" in kernel.addresses()
    assert markers(tmp_path / "state") == {os.getpid(): b"0"}  # the dead writer's marker is gone


def test_a_finished_writers_settled_marker_is_cleaned_up_without_a_full_apply(tmp_path: Path) -> None:
    kernel = MemoryKernel()
    core = make_core(tmp_path / "state", kernel)
    core.apply()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "state" / f"tm4.db.kernel-{dead.pid}").write_bytes(b"0")
    kernel.sets.setdefault("wl4_sip-udp", set()).add("198.51.100.7")  # drift, not an interrupted write
    core.block("203.0.113.5")
    assert "198.51.100.7" in kernel.addresses() and len(kernel.batches) == 1
    assert markers(tmp_path / "state") == {os.getpid(): b"0"}


def test_a_live_writers_marker_is_not_reconciled(tmp_path: Path) -> None:
    kernel = MemoryKernel()
    core = make_core(tmp_path / "state", kernel)
    core.apply()
    live = tmp_path / "state" / f"tm4.db.kernel-{os.getppid()}"
    live.write_bytes(b"1")  # just committed, not yet settled: it holds no lock any more
    assert core.store.interrupted_kernel_changes() == []
    core.block("203.0.113.5")
    assert live.exists() and len(kernel.batches) == 1  # an element change, no full apply


# -- milliseconds -----------------------------------------------------------------

def test_times_keep_milliseconds_and_old_whole_seconds_still_parse(tmp_path: Path) -> None:
    t = datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)
    assert format_time(t) == "2026-01-02T03:04:05.678Z"
    assert format_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05.000Z"
    assert parse_time(T0) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_time("2026-01-02T03:04:05.678Z") == t.replace(microsecond=678_000)
    now = utcnow()
    assert now.microsecond % 1000 == 0 and parse_time(format_time(now)) == now
    core = make_core(tmp_path / "state")
    core.block("203.0.113.9", ttl=timedelta(milliseconds=1500))
    rec = core.store.audit_log()[-1]
    assert len(rec.ts) == len("2026-01-02T03:04:05.678Z") and rec.ts[19] == "."
    b = core.bans()[0]
    assert b.expires is not None and (b.expires - b.created) == timedelta(milliseconds=1500)


def test_fixed_width_times_sort_as_times() -> None:
    times = [datetime(2026, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms) for ms in (0, 5, 999, 1000, 1001)]
    texts = [format_time(t) for t in times]
    assert sorted(texts) == texts and len({len(x) for x in texts}) == 1  # type: ignore[arg-type]


# -- a completely full disk ------------------------------------------------------------

@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    need_root_tools("mount")
    with small_tmpfs(tmp_path / "small") as mnt:
        yield mnt


def test_a_full_disk_leaves_reads_working_and_writes_refused_in_one_line(full_disk: Path) -> None:
    state = full_disk / "state"
    core = make_core(state)
    core.allow("office", ["192.0.2.0/24"], ["sip-udp"])
    core.block("203.0.113.9")
    core.store.close()
    fill(full_disk)
    kernel = MemoryKernel()
    core = make_core(state, kernel)
    assert core.store.read_only == f"no space left on {state}"
    assert [e.name for e in core.entries()] == ["office"] and len(core.bans()) == 1
    assert core.store.audit_log()[-1].action == "block"
    core.apply()  # the rules still load from what is on disk
    assert "203.0.113.9" in kernel.addresses()
    batches = len(kernel.batches)
    for write in (lambda: core.block("198.51.100.7"), lambda: core.allow("x", ["198.51.100.8"], ["ssh"]),
                  lambda: core.unblock("203.0.113.9"), lambda: core.store.set_meta("k", "v")):
        with pytest.raises(StoreError) as exc:
            write()
        assert str(exc.value) == f"no space left on {state}"
    assert len(kernel.batches) == batches  # refused before the kernel was touched


def test_a_disk_that_fills_up_at_the_commit_takes_the_kernel_change_back(full_disk: Path) -> None:
    """Not simulated: the disk really fills between the kernel change and the COMMIT."""
    state = full_disk / "state"
    kernel = MemoryKernel()
    core = make_core(state, kernel)
    core.apply()
    before = {k: set(v) for k, v in kernel.sets.items()}

    class FillingKernel(MemoryKernel):
        def apply_changes(self, changes: Any, now: datetime | None = None) -> None:
            kernel.apply_changes(changes, now)
            fill(full_disk)  # the disk is full once the kernel holds the element

    core.backend = FillingKernel()  # type: ignore[assignment]
    with pytest.raises(StoreError, match="no space left on"):
        core.allow("phone", ["198.51.100.7"], ["sip-udp"], note="x" * 200_000)
    assert kernel.sets == before
    (full_disk / "filler").unlink()
    assert core.entries() == [] and core.store.audit_log() == []


def test_origin_of_a_quarantined_row_is_kept_verbatim(tmp_path: Path) -> None:
    store = Store(tmp_path / "tm4.db")
    poison(store.path)
    store.quarantine_scan()
    row = next(q for q in store.quarantined() if q.key == "192.0.2.66").row
    assert row["origin"] == "martian" and row["lo"] == "zz"
    assert Origin.GUARD.value == "guard"


class FailingMetaWrite(FailingCommit):
    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith("INSERT INTO meta"):
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)


def test_a_write_failing_after_the_kernel_change_in_an_outer_transaction_takes_it_back(tmp_path: Path) -> None:
    """Callers (dial-in, DNS) wrap a grant in a transaction of their own and write more
    after it: a failure there, after the kernel took the element, undoes it too."""
    kernel = MemoryKernel()
    core = make_core(tmp_path / "state", kernel)
    core.apply()
    before = {k: set(v) for k, v in kernel.sets.items()}
    real = core.store._db
    with pytest.raises(StoreError, match="no space left on"), core.store.transaction():
        core.allow("dialin-1", ["198.51.100.7"], ["sip-udp"], ttl=timedelta(hours=1))
        assert "198.51.100.7" in kernel.addresses()
        core.store._db = FailingMetaWrite(real)  # type: ignore[assignment]
        try:
            core.store.set_meta("dialin_last", "x")
        finally:
            core.store._db = real
    assert {k: v for k, v in kernel.sets.items() if v} == {k: v for k, v in before.items() if v}
    assert core.entries() == []


_text = st.one_of(st.none(), st.text(max_size=40), st.integers(-5, 2**40).map(str),
                  st.sampled_from(["224.0.0.1", "ff02::/64", "192.0.2.7", "admin", "guard", T0,
                                   "2026-01-02T03:04:05.678Z", "[]", "{}", '["ssh"]', '["224.0.0.1"]',
                                   '{"x.example.com": ["ff02::1"]}', "0" * 8, "e0000001"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ban=st.fixed_dictionaries({k: _text for k in ("address", "reason", "origin", "created", "expires", "lo",
                                                     "hi")}),
       entry=st.fixed_dictionaries({k: _text for k in ("name", "sources", "services", "origin", "created",
                                                       "expires", "note", "resolved", "endpoints")}),
       family=st.sampled_from([4, 6, 5, None]))
def test_no_row_whatever_it_holds_takes_a_reader_down(tmp_path_factory: pytest.TempPathFactory,
                                                      ban: dict[str, Any], entry: dict[str, Any],
                                                      family: int | None) -> None:
    store = Store(tmp_path_factory.mktemp("s") / "tm4.db")
    raw = sqlite3.connect(store.path)
    with contextlib.suppress(sqlite3.Error):  # NOT NULL and friends: SQLite itself refuses some
        raw.execute("INSERT INTO bans(address, reason, origin, created, expires, offences, family, lo, hi)"
                    " VALUES(?,?,?,?,?,1,?,?,?)", (ban["address"], ban["reason"], ban["origin"], ban["created"],
                                                  ban["expires"], family, ban["lo"], ban["hi"]))
    with contextlib.suppress(sqlite3.Error):
        raw.execute("INSERT INTO entries(name, sources, services, origin, created, expires, note, resolved,"
                    " endpoints) VALUES(?,?,?,?,?,?,?,?,?)", tuple(entry[k] for k in (
                        "name", "sources", "services", "origin", "created", "expires", "note", "resolved",
                        "endpoints")))
    raw.commit()
    raw.close()
    bans, entries = store.bans(), store.entries()
    store.set_items(utcnow())
    for b in bans:
        assert never_source_reason(b.network) is None
    for e in entries:
        assert all(never_source_reason(n) is None for n in e.networks())
    event(f"quarantined={len(store.quarantined())}")
    n_rows = sum(store.rows(f"SELECT count(*) FROM {t}")[0][0] for t in ("bans", "entries"))
    assert n_rows == len(bans) + len(entries)  # what did not parse was moved, not left behind
    store.close()
