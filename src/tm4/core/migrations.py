"""The store's schema, as the migrations that build it: each takes the schema from
version i to i+1 (SQLite's user_version). tm4.core.store applies them in order and
refuses a store newer than this list."""

from __future__ import annotations

# Each migration takes the schema from version i to i+1. Never edit a released one.
MIGRATIONS: list[str] = [
    # 1: the spine
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE entries (
        name TEXT PRIMARY KEY,
        sources TEXT NOT NULL,
        services TEXT NOT NULL,
        origin TEXT NOT NULL,
        created TEXT NOT NULL,
        expires TEXT,
        note TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE bans (
        address TEXT PRIMARY KEY,
        reason TEXT NOT NULL DEFAULT '',
        origin TEXT NOT NULL,
        created TEXT NOT NULL,
        expires TEXT,
        offences INTEGER NOT NULL DEFAULT 1,
        family INTEGER NOT NULL,
        lo TEXT NOT NULL,
        hi TEXT NOT NULL
    );
    CREATE INDEX bans_range ON bans(family, lo, hi);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        origin TEXT NOT NULL,
        actor TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_ts ON audit(ts);
    CREATE TABLE entry_nets (
        name TEXT NOT NULL REFERENCES entries(name) ON DELETE CASCADE,
        family INTEGER NOT NULL,
        lo TEXT NOT NULL,
        hi TEXT NOT NULL
    );
    CREATE INDEX entry_nets_range ON entry_nets(family, lo, hi);
    CREATE INDEX entry_nets_name ON entry_nets(name);
    """,
    # 2: DNS answers kept across failures; repeat offenders remembered after bans expire
    """
    ALTER TABLE entries ADD COLUMN resolved TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE entries ADD COLUMN stale_since TEXT;
    CREATE INDEX entry_nets_wide ON entry_nets(family, lo, hi) WHERE lo != hi;
    CREATE INDEX bans_wide ON bans(family, lo, hi) WHERE lo != hi;
    CREATE TABLE offenders (
        address TEXT PRIMARY KEY,
        offences INTEGER NOT NULL,
        last TEXT NOT NULL
    );
    """,
    # 3: dial-in passcodes (salted scrypt, HMAC lookup index) and failed tries
    """
    CREATE TABLE passcodes (
        owner TEXT PRIMARY KEY,
        lookup TEXT NOT NULL UNIQUE,
        hash TEXT NOT NULL,
        services TEXT NOT NULL DEFAULT '[]',
        ttl TEXT,
        keep INTEGER NOT NULL DEFAULT 1,
        created TEXT NOT NULL,
        last_used TEXT
    );
    CREATE TABLE dialin_failures (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts TEXT NOT NULL,
        callerid TEXT NOT NULL
    );
    CREATE INDEX dialin_failures_ts ON dialin_failures(ts);
    CREATE INDEX dialin_failures_caller ON dialin_failures(callerid, ts);
    """,
    # 4: the endpoints an entry or passcode serves, an entry's zone, rows that no longer
    # parse (set aside, never fatal), blocklists
    """
    ALTER TABLE entries ADD COLUMN endpoints TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE entries ADD COLUMN zone TEXT;
    ALTER TABLE passcodes ADD COLUMN endpoints TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        tbl TEXT NOT NULL,
        key TEXT NOT NULL,
        row TEXT NOT NULL,
        reason TEXT NOT NULL,
        ts TEXT NOT NULL
    );
    CREATE TABLE blocklists (
        name TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        refresh TEXT,
        etag TEXT,
        last_modified TEXT,
        fetched TEXT,
        nets TEXT NOT NULL DEFAULT '[]',
        error TEXT
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
