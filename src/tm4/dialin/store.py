"""The dial-in tables of the store (migration 3 in tm4.core.migrations): passcodes, and failed tries.

Functions of a Store: tm4.dialin.passcodes keeps the passcodes here, tm4.dialin.limits the
failed tries. Every write runs in the store's transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tm4.core.model import format_time
from tm4.core.store import Store

# -- passcodes (salted scrypt hash, HMAC lookup index: tm4.dialin.passcodes) ---------------

def passcodes(store: Store) -> list[dict[str, Any]]:
    return [dict(r) for r in store.rows("SELECT * FROM passcodes ORDER BY owner")]


def get_passcode(store: Store, owner: str) -> dict[str, Any] | None:
    rows = store.rows("SELECT * FROM passcodes WHERE owner = ?", (owner,))
    return dict(rows[0]) if rows else None


def passcode_by_lookup(store: Store, lookup: str) -> dict[str, Any] | None:
    rows = store.rows("SELECT * FROM passcodes WHERE lookup = ?", (lookup,))
    return dict(rows[0]) if rows else None


def put_passcode(store: Store, row: dict[str, Any]) -> None:
    """Insert or replace one owner's passcode (sqlite3.IntegrityError if `lookup` is taken)."""
    with store.transaction() as db:
        db.execute(
            "INSERT INTO passcodes(owner, lookup, hash, services, ttl, keep, created, last_used, endpoints)"
            " VALUES(:owner, :lookup, :hash, :services, :ttl, :keep, :created, :last_used, :endpoints)"
            " ON CONFLICT(owner) DO UPDATE SET lookup=excluded.lookup, hash=excluded.hash,"
            " services=excluded.services, ttl=excluded.ttl, keep=excluded.keep,"
            " created=excluded.created, last_used=excluded.last_used, endpoints=excluded.endpoints",
            {"endpoints": "[]", **row},
        )


def delete_passcode(store: Store, owner: str) -> bool:
    with store.transaction() as db:
        return db.execute("DELETE FROM passcodes WHERE owner = ?", (owner,)).rowcount > 0


def touch_passcode(store: Store, owner: str, ts: datetime) -> None:
    with store.transaction() as db:
        db.execute("UPDATE passcodes SET last_used = ? WHERE owner = ?", (format_time(ts), owner))


# -- failed tries (counted per caller ID and for everyone: tm4.dialin.limits) --------

def add_failure(store: Store, callerid: str, ts: datetime) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO dialin_failures(ts, callerid) VALUES(?, ?)", (format_time(ts), callerid))


def failure_times(store: Store, since: datetime, callerid: str | None = None) -> list[str]:
    """Times (ISO, oldest first) of failed tries since `since`, for one caller ID or all."""
    sql = "SELECT ts FROM dialin_failures WHERE ts > ?"
    args: tuple[Any, ...] = (format_time(since),)
    if callerid is not None:
        sql += " AND callerid = ?"
        args += (callerid,)
    return [r[0] for r in store.rows(sql + " ORDER BY ts, id", args)]


def clear_failures(store: Store, callerid: str) -> None:
    with store.transaction() as db:
        db.execute("DELETE FROM dialin_failures WHERE callerid = ?", (callerid,))


def prune_failures(store: Store, before: datetime) -> None:
    with store.transaction() as db:
        db.execute("DELETE FROM dialin_failures WHERE ts <= ?", (format_time(before),))
