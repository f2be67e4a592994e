"""SQLite state store: WAL, schema versions with migrations, audit trail.

Every write runs in `BEGIN IMMEDIATE`, so writers in several processes queue on
SQLite's lock instead of overwriting each other's read-modify-write.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tm4.core.errors import StoreError, Tm4Error
from tm4.core.migrations import MIGRATIONS, SCHEMA_VERSION
from tm4.core.model import (
    Ban,
    Entry,
    IPNetwork,
    Origin,
    Source,
    check_source,
    format_time,
    parse_network,
    parse_time,
    utcnow,
)

log = logging.getLogger("tm4.store")


@dataclass(frozen=True)
class AuditRecord:
    id: int
    ts: str
    action: str
    subject: str
    origin: str
    actor: str
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "ts": self.ts, "action": self.action, "subject": self.subject,
            "origin": self.origin, "actor": self.actor, "detail": self.detail,
        }


@dataclass(frozen=True)
class QuarantinedRow:
    """A row that no longer parses (an older tm4 wrote it, or a hand edit), set aside."""

    id: int
    table: str
    key: str
    row: dict[str, Any]
    reason: str
    ts: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "table": self.table, "key": self.key, "row": self.row,
                "reason": self.reason, "ts": self.ts}


def no_space(path: Path) -> bool:
    """Is the file system holding `path` full (no block or no inode left for us)?"""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024 or (st.f_files > 0 and st.f_favail == 0)


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        # Set when the disk is full: the store is opened read-only (reading verbs still
        # answer) and every write is refused with this one-line reason.
        self.read_only: str | None = None
        self._depth = 0
        self._on_commit: list[Callable[[], None]] = []
        self._on_abort: list[Callable[[], None]] = []
        self._marked = False  # this transaction changed kernel elements
        self._marker_fd: int | None = None
        self._marker_pid = 0
        self._reported: set[tuple[str, str]] = set()
        # A connection must not cross fork(): closing the child's copy would drop the
        # parent's POSIX locks on the file and let two writers in at once.
        self._pid = os.getpid()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._db = self._connect()
        except (OSError, sqlite3.Error) as exc:
            if not (self.path.exists() and (_is_full(exc) or no_space(self.path.parent))):
                raise StoreError(f"cannot open the store {self.path}: {exc}") from None
            self._db = self._connect_read_only()
            self.read_only = f"no space left on {self.path.parent}"
            log.info("event=store_read_only path=%s reason=%s", self.path, self.read_only)
            return
        with suppress(OSError):
            os.chmod(self.path, 0o600)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout = 30000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            self._db = db
            if self.version < SCHEMA_VERSION:
                self.migrate()
            elif self.version > SCHEMA_VERSION:
                raise StoreError(
                    f"the store {self.path} has schema {self.version}, newer than this tm4 ({SCHEMA_VERSION})"
                )
        except BaseException:
            db.close()
            raise
        return db

    def _connect_read_only(self) -> sqlite3.Connection:
        """The store as it is on disk, without the WAL index SQLite cannot create on a
        full disk (immutable: nobody can write to a full disk anyway)."""
        try:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?immutable=1", uri=True,
                                 isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store {self.path} (no space left on "
                             f"{self.path.parent}): {exc}") from None
        return db

    def close(self) -> None:
        self._db.close()
        if self._marker_fd is not None and self._marker_pid == os.getpid():
            with suppress(OSError):
                os.close(self._marker_fd)
            self._marker_fd = None

    # -- schema -------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        with self.transaction():
            current = self.version
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"the store {self.path} has schema {current}, newer than this tm4 ({SCHEMA_VERSION})"
                )
            for i in range(current, SCHEMA_VERSION):
                for stmt in _statements(MIGRATIONS[i]):
                    self._db.execute(stmt)
                self._db.execute(f"PRAGMA user_version = {i + 1}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; nested calls join the outer one.

        When it does not commit (an error inside, or the COMMIT itself failing on a full
        disk) the `on_abort` compensations run, newest first: what was done outside the
        database (kernel elements) is undone too."""
        if self._pid != os.getpid():
            raise StoreError("the store was opened before fork(); open it again in this process")
        if self._depth:
            self._depth += 1
            try:
                yield self._db
            finally:
                self._depth -= 1
            return
        if self.read_only:
            raise StoreError(self.read_only)
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._write_error(exc) from None
        self._depth = 1
        self._on_commit, self._on_abort = [], []
        self._marked = False
        try:
            try:
                yield self._db
            except sqlite3.Error as exc:  # a write that failed (full disk) is one line, typed
                self._rollback()
                raise self._write_error(exc) from None
            except BaseException:
                self._rollback()
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._write_error(exc) from None
            commit_hooks = self._on_commit
            self._on_commit, self._on_abort = [], []
            for hook in commit_hooks:
                hook()
        finally:
            self._depth = 0

    def on_commit(self, hook: Callable[[], None]) -> None:
        """Run `hook` once the current transaction has committed."""
        self._on_commit.append(hook)

    def on_abort(self, hook: Callable[[], None]) -> None:
        """Run `hook` if the current transaction does not commit (its compensation)."""
        self._on_abort.append(hook)

    def _rollback(self) -> None:
        with suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")
        hooks, self._on_commit, self._on_abort = self._on_abort, [], []
        undone = True
        for hook in reversed(hooks):
            try:
                hook()
            except Exception as exc:  # noqa: BLE001 — keep undoing the rest; the marker stays
                undone = False
                log.error("event=undo_failed reason=%s", exc)
        if self._marked:
            # Not undone: the kernel may still hold what the store does not, and whoever
            # writes next (or applies) reconciles, this process included.
            self._set_marker(SETTLED if undone else UNDO_FAILED)

    def _write_error(self, exc: sqlite3.Error) -> StoreError:
        if _is_full(exc) or no_space(self.path.parent):
            return StoreError(f"no space left on {self.path.parent}")
        return StoreError(f"could not write the store {self.path}: {exc}")

    # -- kernel changes in flight ---------------------------------------------
    # Each writing process keeps one marker file, `<store>.kernel-<pid>`, holding one
    # byte: IN_WINDOW from just before it changes kernel elements inside a transaction
    # until that transaction ends, SETTLED otherwise, UNDO_FAILED when a rollback could
    # not take its kernel change back. A dead process's IN_WINDOW means it was killed
    # between the kernel change and the commit: the kernel may hold an element the store
    # does not know, and the next writer (or apply) reconciles with a full apply.
    # One pwrite per state change: no file is created or removed per change.
    def mark_kernel_change(self) -> None:
        """Call inside a transaction before changing kernel elements."""
        if self._marked:
            return
        self._set_marker(IN_WINDOW)
        self._marked = True
        self.on_commit(lambda: self._set_marker(SETTLED))

    def _set_marker(self, state: bytes) -> None:
        path = self.path.with_name(f"{self.path.name}.kernel-{os.getpid()}")
        try:
            if self._marker_fd is None or self._marker_pid != os.getpid():
                self._marker_fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
                self._marker_pid = os.getpid()
            os.pwrite(self._marker_fd, state, 0)
        except OSError as exc:
            if state != IN_WINDOW:
                log.error("event=marker_write_failed path=%s reason=%s", path, exc.strerror)
                return
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(f"no space left on {self.path.parent}") from None
            raise StoreError(f"cannot write {path}: {exc.strerror}") from None
        if state != IN_WINDOW:
            self._marked = False

    def interrupted_kernel_changes(self) -> list[Path]:
        """Markers of writers killed mid-change, and of undos that failed (any process's,
        this one's included). Call with the write lock held (inside a transaction)."""
        out: list[Path] = []
        prefix = f"{self.path.name}.kernel-"
        with os.scandir(self.path.parent) as it:
            names = [e.name for e in it if e.name.startswith(prefix)]
        for name in names:
            m = self.path.parent / name
            pid_text = name[len(prefix):]
            try:
                state = m.read_bytes()[:1]
            except OSError:
                continue
            if not pid_text.isdigit():
                continue
            alive = _alive(int(pid_text))
            if state == UNDO_FAILED or (state == IN_WINDOW and not alive):
                out.append(m)
            elif not alive:
                with suppress(OSError):
                    m.unlink()  # a finished writer's settled marker: nothing to do
        return out

    def forget_kernel_changes(self, markers: Sequence[Path]) -> None:
        """The kernel was reconciled with the store: the markers are settled."""
        for m in markers:
            pid_text = m.name.rsplit("-", 1)[-1]
            if pid_text == str(os.getpid()) and self._marked:
                continue  # this process is in its own window: its commit settles the marker
            with suppress(OSError):
                if pid_text.isdigit() and _alive(int(pid_text)):
                    fd = os.open(m, os.O_WRONLY)
                    try:
                        os.pwrite(fd, SETTLED, 0)
                    finally:
                        os.close(fd)
                else:
                    m.unlink()

    # -- meta ---------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str | None) -> None:
        with self.transaction() as db:
            if value is None:
                db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                db.execute(
                    "INSERT INTO meta(key, value) VALUES(?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

    # -- entries ------------------------------------------------------------
    def entries(self) -> list[Entry]:
        rows = self._db.execute("SELECT * FROM entries ORDER BY name").fetchall()
        return self._parsed("entries", rows)

    def get_entry(self, name: str) -> Entry | None:
        row = self._db.execute("SELECT * FROM entries WHERE name = ?", (name,)).fetchone()
        found = self._parsed("entries", [row] if row else [])
        return found[0] if found else None

    def put_entry(self, e: Entry) -> None:
        for n in e.networks():
            check_source(n)  # never stored: readers would refuse it back
        with self.transaction() as db:
            db.execute(
                "INSERT INTO entries(name, sources, services, origin, created, expires, note, resolved, stale_since,"
                " endpoints, zone) VALUES(?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET"
                " sources=excluded.sources, services=excluded.services, origin=excluded.origin,"
                " created=excluded.created, expires=excluded.expires, note=excluded.note,"
                " resolved=excluded.resolved, stale_since=excluded.stale_since, endpoints=excluded.endpoints,"
                " zone=excluded.zone",
                (
                    e.name,
                    json.dumps([s.text for s in e.sources]),
                    json.dumps(list(e.services)),
                    str(e.origin),
                    format_time(e.created),
                    format_time(e.expires),
                    e.note,
                    json.dumps({k: [str(n) for n in v] for k, v in e.resolved.items()}),
                    format_time(e.stale_since),
                    json.dumps(list(e.endpoints)),
                    e.zone,
                ),
            )
            db.execute("DELETE FROM entry_nets WHERE name = ?", (e.name,))
            db.executemany(
                "INSERT INTO entry_nets(name, family, lo, hi) VALUES(?,?,?,?)",
                [(e.name, *range_key(n)) for n in e.networks()],
            )

    def entries_overlapping(self, net: IPNetwork) -> list[Entry]:
        """Entries with a network that overlaps `net` (an index lookup, not a scan)."""
        fam, lo, hi = range_key(net)
        # Two index range scans: single addresses inside `net`, and the (few) networks
        # overlapping it. One `lo <= hi AND hi >= lo` scan would walk half the table.
        rows = self._db.execute(
            "SELECT * FROM entries WHERE name IN ("
            " SELECT name FROM entry_nets WHERE family = ? AND lo >= ? AND lo <= ? AND lo = hi"
            " UNION SELECT name FROM entry_nets WHERE family = ? AND lo <= ? AND hi >= ? AND lo != hi"
            ") ORDER BY name",
            (fam, lo, hi, fam, hi, lo),
        ).fetchall()
        return self._parsed("entries", rows)

    def bans_overlapping(self, net: IPNetwork) -> list[Ban]:
        fam, lo, hi = range_key(net)
        rows = self._db.execute(
            "SELECT * FROM bans WHERE family = ? AND lo >= ? AND lo <= ? AND lo = hi"
            " UNION SELECT * FROM bans WHERE family = ? AND lo <= ? AND hi >= ? AND lo != hi",
            (fam, lo, hi, fam, hi, lo),
        ).fetchall()
        return self._parsed("bans", rows)

    def set_items(self, now: datetime) -> dict[str, list[tuple[int, int, datetime | None]]]:
        """Set name -> raw intervals of every active entry and ban, straight from the
        range columns: no address objects, so 100,000 bans render in well under a second."""
        from tm4.core.rules import ban_set, wl_set

        stamp = format_time(now)
        times: dict[str | None, datetime | None] = {None: None}

        def when(t: str | None) -> datetime | None:
            if t not in times:
                times[t] = parse_time(t)
            return times[t]

        out: dict[str, list[tuple[int, int, datetime | None]]] = {}
        rows = self._db.execute(
            "SELECT n.family, n.lo, n.hi, e.services, e.expires FROM entry_nets n JOIN entries e"
            " ON e.name = n.name WHERE e.expires IS NULL OR e.expires > ?", (stamp,))
        services_cache: dict[str, list[str]] = {}
        for fam, lo_s, hi_s, svcs, exp in rows:
            try:
                lo, hi = _interval(fam, lo_s, hi_s)
                if svcs not in services_cache:
                    services_cache[svcs] = [str(x) for x in json.loads(svcs)]
                expires = when(exp)
            except (ValueError, TypeError, KeyError):
                continue  # a row that no longer parses: the readers quarantine it
            for svc in services_cache[svcs]:
                out.setdefault(wl_set(svc, fam, lo != hi), []).append((lo, hi, expires))
        rows = self._db.execute(
            "SELECT family, lo, hi, expires FROM bans WHERE expires IS NULL OR expires > ?", (stamp,))
        for fam, lo_s, hi_s, exp in rows:
            try:
                lo, hi = _interval(fam, lo_s, hi_s)
                expires = when(exp)
            except (ValueError, TypeError, KeyError):
                continue
            out.setdefault(ban_set(fam, lo != hi), []).append((lo, hi, expires))
        return out

    def delete_entry(self, name: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM entries WHERE name = ?", (name,)).rowcount > 0

    # -- bans ---------------------------------------------------------------
    def bans(self) -> list[Ban]:
        rows = self._db.execute("SELECT * FROM bans ORDER BY address").fetchall()
        return self._parsed("bans", rows)

    def get_ban(self, address: str) -> Ban | None:
        row = self._db.execute("SELECT * FROM bans WHERE address = ?", (address,)).fetchone()
        found = self._parsed("bans", [row] if row else [])
        return found[0] if found else None

    def put_ban(self, b: Ban) -> None:
        check_source(b.network)  # never stored: readers would refuse it back
        with self.transaction() as db:
            db.execute(
                "INSERT INTO bans(address, reason, origin, created, expires, offences, family, lo, hi)"
                " VALUES(?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(address) DO UPDATE SET reason=excluded.reason, origin=excluded.origin,"
                " created=excluded.created, expires=excluded.expires, offences=excluded.offences",
                (b.address, b.reason, str(b.origin), format_time(b.created), format_time(b.expires),
                 b.offences, *range_key(b.network)),
            )
            db.execute(
                "INSERT INTO offenders(address, offences, last) VALUES(?,?,?) ON CONFLICT(address)"
                " DO UPDATE SET offences=max(offences, excluded.offences), last=excluded.last",
                (b.address, b.offences, format_time(b.created)),
            )

    def delete_ban(self, address: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM bans WHERE address = ?", (address,)).rowcount > 0

    def offences(self, address: str) -> int:
        row = self._db.execute("SELECT offences FROM offenders WHERE address = ?", (address,)).fetchone()
        return int(row[0]) if row else 0

    # -- rows that no longer parse ---------------------------------------------
    def _parsed(self, table: str, rows: Sequence[sqlite3.Row]) -> list[Any]:
        """Parse rows of `entries` or `bans`; one that fails is never fatal: it is logged
        once, moved to the quarantine table (when the store is writable) and left out."""
        parse = _row_entry if table == "entries" else _row_ban
        out: list[Any] = []
        for r in rows:
            try:
                out.append(parse(r))
            except (Tm4Error, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
                self._quarantine(table, r, _why(exc))
        return out

    def _quarantine(self, table: str, r: sqlite3.Row, reason: str) -> None:
        key_col = "name" if table == "entries" else "address"
        key = str(r[key_col])
        if (table, key) not in self._reported:
            self._reported.add((table, key))
            log.error("event=row_quarantined table=%s key=%r reason=%r (see `tm4 quarantine list`)",
                      table, key, reason)
        try:
            with self.transaction() as db:
                db.execute("INSERT INTO quarantine(tbl, key, row, reason, ts) VALUES(?,?,?,?,?)",
                           (table, key, json.dumps(dict(r), default=str), reason, format_time(utcnow())))
                # rowid: the key column itself may be what is broken (NULL, wrong type)
                db.execute(f"DELETE FROM {table} WHERE rowid = (SELECT rowid FROM {table} WHERE "
                           f"{key_col} IS ?)", (r[key_col],))
        except (StoreError, sqlite3.Error) as exc:
            log.debug("event=quarantine_deferred table=%s key=%r reason=%s", table, key, exc)

    def quarantined(self) -> list[QuarantinedRow]:
        rows = self._db.execute("SELECT * FROM quarantine ORDER BY id").fetchall()
        out = []
        for r in rows:
            try:
                row = json.loads(r["row"])
            except ValueError:
                row = {"raw": r["row"]}
            out.append(QuarantinedRow(int(r["id"]), r["tbl"], r["key"], row, r["reason"], r["ts"]))
        return out

    def drop_quarantined(self, ids: Sequence[int] | None) -> int:
        """Forget quarantined rows (all of them when `ids` is None); how many went."""
        with self.transaction() as db:
            if ids is None:
                return db.execute("DELETE FROM quarantine").rowcount
            return sum(db.execute("DELETE FROM quarantine WHERE id = ?", (i,)).rowcount for i in ids)

    def quarantine_scan(self) -> int:
        """Parse every entry and ban once (start-up): what no longer parses is set aside
        before anything relies on it. How many rows are in quarantine afterwards."""
        self.entries()
        self.bans()
        return int(self._db.execute("SELECT count(*) FROM quarantine").fetchone()[0])

    # -- audit --------------------------------------------------------------
    def audit(self, action: str, subject: str, origin: str, actor: str, now: datetime, **detail: Any) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO audit(ts, action, subject, origin, actor, detail) VALUES(?,?,?,?,?,?)",
                (format_time(now), action, subject, str(origin), actor, json.dumps(detail, sort_keys=True, default=str)),
            )

    def audit_log(self, limit: int = 100, subject: str | None = None) -> list[AuditRecord]:
        sql = "SELECT * FROM audit"
        args: tuple[Any, ...] = ()
        if subject:
            sql += " WHERE subject = ?"
            args = (subject,)
        sql += " ORDER BY id DESC LIMIT ?"
        rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [
            AuditRecord(r["id"], r["ts"], r["action"], r["subject"], r["origin"], r["actor"], json.loads(r["detail"]))
            for r in reversed(rows)
        ]

    # -- snapshots (apply --confirm) -----------------------------------------
    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        return {
            t: [dict(r) for r in self._db.execute(f"SELECT * FROM {t}").fetchall()]
            for t in ("entries", "entry_nets", "bans")
        }

    def restore(self, snap: dict[str, list[dict[str, Any]]]) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM entry_nets")
            for table, rows in snap.items():
                if table not in ("entries", "entry_nets", "bans"):
                    raise StoreError(f"snapshot holds unknown table {table!r}")
                db.execute(f"DELETE FROM {table}")
                for row in rows:
                    cols = ",".join(row)
                    marks = ",".join("?" for _ in row)
                    db.execute(f"INSERT INTO {table}({cols}) VALUES({marks})", tuple(row.values()))

    # -- reads for the tables other modules keep (tm4.dialin.store) ------------
    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """The rows of one read query (the dial-in tables: tm4.dialin.store)."""
        return self._db.execute(sql, args).fetchall()


def range_key(net: IPNetwork) -> tuple[int, str, str]:
    """(family, lo, hi) as fixed-width hex, so SQL string order is address order."""
    width = 8 if net.version == 4 else 32
    lo = int(net.network_address)
    hi = int(net.broadcast_address)
    return net.version, f"{lo:0{width}x}", f"{hi:0{width}x}"


IN_WINDOW, SETTLED, UNDO_FAILED = b"1", b"0", b"F"  # the byte in a kernel-change marker


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def _interval(fam: Any, lo_s: Any, hi_s: Any) -> tuple[int, int]:
    width = {4: 8, 6: 32}[fam]
    if len(lo_s) != width or len(hi_s) != width:
        raise ValueError("bad range columns")
    lo, hi = int(lo_s, 16), int(hi_s, 16)
    if lo > hi:
        raise ValueError("bad range columns")
    return lo, hi


def _is_full(exc: BaseException) -> bool:
    return (getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            or "disk is full" in str(exc))


def _why(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, Tm4Error) else f"{type(exc).__name__}: {exc}"


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _row_entry(r: sqlite3.Row) -> Entry:
    resolved = json.loads(r["resolved"] or "{}")
    return Entry(
        name=r["name"],
        sources=tuple(Source.parse(s, force=True) for s in json.loads(r["sources"])),
        services=tuple(json.loads(r["services"])),
        origin=Origin(r["origin"]),
        created=parse_time(r["created"]),  # type: ignore[arg-type]
        expires=parse_time(r["expires"]),
        note=r["note"],
        resolved={k: tuple(parse_network(n, force=True) for n in v) for k, v in resolved.items()},
        stale_since=parse_time(r["stale_since"]),
        endpoints=tuple(json.loads(r["endpoints"] or "[]")),
        zone=r["zone"],
    )


def _row_ban(r: sqlite3.Row) -> Ban:
    return Ban(
        network=parse_network(r["address"], force=True),
        reason=r["reason"],
        origin=Origin(r["origin"]),
        created=parse_time(r["created"]),  # type: ignore[arg-type]
        expires=parse_time(r["expires"]),
        offences=int(r["offences"]),
    )
