"""Dial-in passcodes: generated once, shown once, stored as salted scrypt hashes.

Storage, per owner: `scrypt$N$r$p$<salt>$<key>` (base64, no padding) with the
fixed cost N=2^14, r=8, p=1, a 16-byte random salt and a 32-byte key (about
16 MiB and ~50 ms per check). To find the owner of a typed passcode without
one scrypt per owner, each passcode is also indexed by HMAC-SHA256 keyed with a
server secret (`<state_dir>/dialin.key`, 32 random bytes, mode 0600, kept out
of the database so a leaked copy of the database alone cannot be brute-forced
offline). A try costs exactly one scrypt whether or not the index matched, and
the final comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tm4.core.durations import format_duration, parse_duration
from tm4.core.errors import ConflictError, NotFoundError, StoreError, ValidationError
from tm4.core.model import format_time, parse_time, utcnow, validate_endpoint, validate_name
from tm4.core.store import Store
from tm4.dialin import store as dialin_store

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
SALT_BYTES = 16
KEY_BYTES = 32
KEY_FILE = "dialin.key"

MIN_DIGITS = 6
MAX_DIGITS = 20
DEFAULT_DIGITS = 8

_OWNER_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,55}")
_INDEX_LABEL = b"tm4-passcode-index\x00"
_DUMMY_SALT = b"tm4-dummy-salt!!"


@dataclass(frozen=True)
class Passcode:
    """An owner's passcode settings (never the passcode itself)."""

    owner: str
    services: tuple[str, ...]  # empty: [dialin] grant_services
    ttl: str | None  # None: [dialin] grant_ttl
    keep: int  # how many dial-in addresses the owner may hold at once
    created: datetime
    last_used: datetime | None
    endpoints: tuple[str, ...] = ()  # PJSIP endpoints its grants serve (tm4.asterisk.acl)

    @property
    def entry_name(self) -> str:
        return f"dialin-{self.owner}"

    def to_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "entry": self.entry_name,
            "services": list(self.services),
            "ttl": self.ttl,
            "keep": self.keep,
            "created": format_time(self.created),
            "last_used": format_time(self.last_used),
            "endpoints": list(self.endpoints),
        }


def validate_owner(owner: str) -> str:
    if not _OWNER_RE.fullmatch(owner or ""):
        raise ValidationError(
            f"bad owner {owner!r}: use 1-56 of a-z 0-9 . _ - starting with a letter or digit"
        )
    validate_name(f"dialin-{owner}")
    return owner


def validate_passcode(passcode: str) -> str:
    if not re.fullmatch(r"\d+", passcode or ""):
        raise ValidationError("a passcode is digits only (0-9)")
    if len(passcode) < MIN_DIGITS:
        raise ValidationError(f"a passcode has at least {MIN_DIGITS} digits")
    if len(passcode) > MAX_DIGITS:
        raise ValidationError(f"a passcode has at most {MAX_DIGITS} digits")
    return passcode


def generate_passcode(length: int = DEFAULT_DIGITS) -> str:
    if not MIN_DIGITS <= length <= MAX_DIGITS:
        raise ValidationError(f"passcode length must be {MIN_DIGITS} to {MAX_DIGITS} digits")
    return "".join(str(secrets.randbelow(10)) for _ in range(length))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_passcode(passcode: str, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    dk = hashlib.scrypt(passcode.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_DKLEN)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(dk)}"


def check_hash(passcode: str, stored: str) -> bool:
    """Recompute with the stored salt and cost; compare in constant time."""
    try:
        kind, n, r, p, salt, dk = stored.split("$")
        if kind != "scrypt":
            return False
        want = _unb64(dk)
        got = hashlib.scrypt(passcode.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(want), maxmem=64 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def load_key(state_dir: Path) -> bytes:
    """The server secret for the passcode index; created (0600) on first use."""
    path = Path(state_dir) / KEY_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = _create_key(path)
    except OSError as exc:
        raise StoreError(f"cannot read the dial-in key {path}: {exc.strerror}") from None
    if len(raw) != KEY_BYTES:
        raise StoreError(f"the dial-in key {path} is damaged ({len(raw)} bytes, want {KEY_BYTES})")
    return raw


def _create_key(path: Path) -> bytes:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()  # another process won the race
    except OSError as exc:
        raise StoreError(f"cannot create the dial-in key {path}: {exc.strerror}") from None
    key = secrets.token_bytes(KEY_BYTES)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


class PasscodeBook:
    """The passcodes in the store, with the index key."""

    def __init__(self, store: Store, key: bytes, clock: Callable[[], datetime] = utcnow):
        self.store = store
        self.key = key
        self.clock = clock

    @classmethod
    def open(cls, store: Store, state_dir: Path, clock: Callable[[], datetime] = utcnow) -> PasscodeBook:
        return cls(store, load_key(state_dir), clock)

    def lookup(self, passcode: str) -> str:
        return hmac.new(self.key, _INDEX_LABEL + passcode.encode(), hashlib.sha256).hexdigest()

    # -- admin ----------------------------------------------------------------
    def add(
        self,
        owner: str,
        passcode: str | None = None,
        *,
        services: Sequence[str] = (),
        ttl: str | None = None,
        keep: int = 1,
        length: int = DEFAULT_DIGITS,
        endpoints: Sequence[str] = (),
    ) -> str:
        """Create an owner's passcode; returns it (the only time it exists in clear)."""
        validate_owner(owner)
        eps = tuple(dict.fromkeys(validate_endpoint(e) for e in endpoints))
        if keep < 1 or keep > 16:
            raise ValidationError("--keep must be 1 to 16")
        if ttl is not None:
            ttl = format_duration(parse_duration(ttl))
        if dialin_store.get_passcode(self.store, owner) is not None:
            raise ConflictError(f"{owner!r} already has a passcode (use `tm4 passcode rotate {owner}`)")
        return self._write(owner, passcode, services=tuple(services), ttl=ttl, keep=keep,
                           length=length, created=self.clock(), endpoints=eps)

    def rotate(self, owner: str, passcode: str | None = None, *, length: int = DEFAULT_DIGITS) -> str:
        """A new passcode for an existing owner; the old one stops working at once."""
        old = self.get(owner)
        return self._write(owner, passcode, services=old.services, ttl=old.ttl, keep=old.keep,
                           length=length, created=self.clock(), endpoints=old.endpoints)

    def _write(self, owner: str, passcode: str | None, *, services: tuple[str, ...], ttl: str | None,
               keep: int, length: int, created: datetime, endpoints: tuple[str, ...] = ()) -> str:
        chosen = passcode is not None
        for _ in range(20):
            code = validate_passcode(passcode) if chosen else generate_passcode(length)  # type: ignore[arg-type]
            lookup = self.lookup(code)
            with self.store.transaction():
                holder = dialin_store.passcode_by_lookup(self.store, lookup)
                if holder is not None and holder["owner"] != owner:
                    if chosen:
                        raise ConflictError("that passcode is already in use; choose another")
                    continue
                try:
                    dialin_store.put_passcode(self.store, {
                        "owner": owner, "lookup": lookup, "hash": hash_passcode(code),
                        "services": json.dumps(list(services)), "ttl": ttl, "keep": keep,
                        "created": format_time(created), "last_used": None,
                        "endpoints": json.dumps(list(endpoints)),
                    })
                except sqlite3.IntegrityError:
                    if chosen:
                        raise ConflictError("that passcode is already in use; choose another") from None
                    continue
            return code
        raise ConflictError("could not generate a unique passcode; use a longer --length")

    def delete(self, owner: str) -> None:
        validate_owner(owner)
        if not dialin_store.delete_passcode(self.store, owner):
            raise NotFoundError(f"{owner!r} has no passcode")

    def get(self, owner: str) -> Passcode:
        validate_owner(owner)
        row = dialin_store.get_passcode(self.store, owner)
        if row is None:
            raise NotFoundError(f"{owner!r} has no passcode")
        return _row(row)

    def list(self) -> list[Passcode]:
        return [_row(r) for r in dialin_store.passcodes(self.store)]

    # -- the call -------------------------------------------------------------
    def verify(self, passcode: str) -> Passcode | None:
        """The owner whose passcode this is, or None. Always exactly one scrypt."""
        code = passcode if isinstance(passcode, str) else ""
        well_formed = bool(re.fullmatch(rf"\d{{{MIN_DIGITS},{MAX_DIGITS}}}", code))
        row = dialin_store.passcode_by_lookup(self.store, self.lookup(code)) if well_formed else None
        if row is None:
            hash_passcode(code[:MAX_DIGITS], _DUMMY_SALT)  # same cost as a real check
            return None
        if not check_hash(code, row["hash"]):
            return None
        return _row(row)

    def mark_used(self, owner: str) -> None:
        dialin_store.touch_passcode(self.store, owner, self.clock())


def _row(r: dict[str, Any]) -> Passcode:
    return Passcode(
        owner=r["owner"],
        services=tuple(json.loads(r["services"] or "[]")),
        ttl=r["ttl"],
        keep=int(r["keep"]),
        created=parse_time(r["created"]) or utcnow(),
        last_used=parse_time(r["last_used"]),
        endpoints=tuple(json.loads(r.get("endpoints") or "[]")),
    )
