"""Passcodes: scrypt with fixed cost, HMAC index with a server secret, one scrypt per try."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

import pytest

from tm4.core.errors import ConflictError, NotFoundError, StoreError, ValidationError
from tm4.core.store import Store
from tm4.dialin import passcodes as pc
from tm4.dialin import store as dialin_store
from tm4.dialin.passcodes import PasscodeBook, check_hash, hash_passcode


@pytest.fixture
def book(tmp_path: Path) -> PasscodeBook:
    store = Store(tmp_path / "state" / "tm4.db")
    return PasscodeBook.open(store, tmp_path / "state")


def test_documented_cost_and_format() -> None:
    h = hash_passcode("48213977")
    kind, n, r, p, salt, dk = h.split("$")
    assert (kind, int(n), int(r), int(p)) == ("scrypt", 2**14, 8, 1)
    assert len(pc._unb64(salt)) == 16 and len(pc._unb64(dk)) == 32
    assert h != hash_passcode("48213977"), "salted: the same passcode hashes differently"
    assert check_hash("48213977", h) and not check_hash("48213978", h)
    assert not check_hash("48213977", "md5$x") and not check_hash("48213977", "garbage")


def test_generated_passcodes(book: PasscodeBook) -> None:
    code = book.add("alice")
    assert code.isdigit() and len(code) == pc.DEFAULT_DIGITS
    assert len(book.add("bob", length=6)) == 6
    with pytest.raises(ValidationError):
        book.add("carol", length=5)


def test_only_a_hash_is_stored(book: PasscodeBook, tmp_path: Path) -> None:
    code = book.add("alice", "90817263")
    row = dialin_store.get_passcode(book.store, "alice")
    assert row is not None and code not in str(row)
    assert row["hash"].startswith("scrypt$")
    assert row["lookup"] == hmac.new(book.key, b"tm4-passcode-index\x00" + code.encode(), hashlib.sha256).hexdigest()
    book.store.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "state").glob("tm4.db*"))
    assert code.encode() not in raw


def test_verify_finds_the_owner(book: PasscodeBook) -> None:
    book.add("alice", "90817263", services=["sip-udp"], ttl="8h", keep=2)
    book.add("bob", "11223344")
    got = book.verify("90817263")
    assert got is not None and got.owner == "alice" and got.services == ("sip-udp",)
    assert got.ttl == "8h" and got.keep == 2 and got.entry_name == "dialin-alice"
    assert book.verify("11223344").owner == "bob"  # type: ignore[union-attr]
    for wrong in ("90817264", "", "123", "9" * 300, "9081726x"):
        assert book.verify(wrong) is None


def test_every_try_costs_exactly_one_scrypt(book: PasscodeBook, monkeypatch: pytest.MonkeyPatch) -> None:
    book.add("alice", "90817263")
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*a: object, **kw: object) -> bytes:
        calls.append(1)
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pc.hashlib, "scrypt", counting)
    for attempt in ("90817263", "90817264", "", "12", "1" * 300):
        calls.clear()
        book.verify(attempt)
        assert len(calls) == 1, attempt


def test_comparison_is_constant_time(book: PasscodeBook, monkeypatch: pytest.MonkeyPatch) -> None:
    book.add("alice", "90817263")
    used: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        used.append((a, b))
        return real(a, b)

    monkeypatch.setattr(pc.hmac, "compare_digest", spy)
    assert book.verify("90817263") is not None
    assert used and all(len(a) == 32 for a, _ in used)


def test_unique_passcodes(book: PasscodeBook) -> None:
    book.add("alice", "90817263")
    with pytest.raises(ConflictError):
        book.add("bob", "90817263")
    with pytest.raises(ConflictError):
        book.add("alice", "55555555")  # one passcode per owner: rotate instead
    assert [p.owner for p in book.list()] == ["alice"]


def test_bad_owner_and_passcode(book: PasscodeBook) -> None:
    for owner in ("", "Alice", "-x", "a b", "x" * 57):
        with pytest.raises(ValidationError):
            book.add(owner)
    for code in ("12345", "abcdef", "1234 56", "1" * 21):
        with pytest.raises(ValidationError):
            book.add("alice", code)
    with pytest.raises(ValidationError):
        book.add("alice", keep=0)


def test_rotate_and_delete(book: PasscodeBook) -> None:
    old = book.add("alice", "90817263", keep=3)
    new = book.rotate("alice")
    assert new != old
    assert book.verify(old) is None
    assert book.verify(new).keep == 3  # type: ignore[union-attr]
    book.delete("alice")
    assert book.verify(new) is None
    with pytest.raises(NotFoundError):
        book.rotate("alice")
    with pytest.raises(NotFoundError):
        book.delete("alice")


def test_key_file_is_private_and_stable(tmp_path: Path) -> None:
    k1 = pc.load_key(tmp_path)
    mode = stat.S_IMODE(os.stat(tmp_path / pc.KEY_FILE).st_mode)
    assert mode == 0o600 and len(k1) == 32
    assert pc.load_key(tmp_path) == k1
    (tmp_path / pc.KEY_FILE).write_bytes(b"short")
    with pytest.raises(StoreError):
        pc.load_key(tmp_path)


def test_another_key_finds_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "tm4.db")
    PasscodeBook(store, b"k" * 32).add("alice", "90817263")
    assert PasscodeBook(store, b"j" * 32).verify("90817263") is None
    assert PasscodeBook(store, b"k" * 32).verify("90817263") is not None


def test_migration_3_tables(tmp_path: Path) -> None:
    store = Store(tmp_path / "tm4.db")
    assert store.version >= 3
    names = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"passcodes", "dialin_failures"} <= names
