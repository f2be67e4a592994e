"""The dial-in operations tm4d offers the Asterisk group: verify, limits, tokens, grant."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from dialin_support import Clock, MemoryKernel, add_passcode, entry_addresses, make_core

from tm4.core.errors import ConflictError, ValidationError
from tm4.core.model import Origin
from tm4.dialin.ops import DIALIN_OPS, issue_token, passcode_book, read_token
from tm4.ops.engine import Core

CODE = "48213977"


def op(core: Core, name: str, **args: Any) -> dict[str, Any]:
    return DIALIN_OPS[f"dialin.{name}"](core, args)


def verify(core: Core, code: str = CODE, callerid: str = "5551234", **kw: Any) -> dict[str, Any]:
    return op(core, "verify", passcode=code, callerid=callerid, **kw)


def audit(core: Core, action: str | None = None) -> list[Any]:
    return [r for r in core.store.audit_log(1000) if action is None or r.action == action]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(tmp_path: Path, clock: Clock) -> Core:
    c = make_core(tmp_path, {"external_address": "198.51.100.1", "forbidden": ["203.0.113.128/25"]},
                  clock=clock)
    add_passcode(c, "alice", CODE)
    return c


def test_the_operations_on_offer() -> None:
    assert set(DIALIN_OPS) == {"dialin.verify", "dialin.check_address", "dialin.grant",
                               "dialin.external_address"}


def test_right_and_wrong_passcode(core: Core) -> None:
    ok = verify(core)
    assert ok["ok"] and ok["token"] and ok["delay"] == 0 and ok["own_address"] == ""
    assert read_token(passcode_book(core), ok["token"], "5551234") == "alice"
    assert audit(core, "dialin-verify")[0].subject == "dialin-alice"
    assert passcode_book(core).get("alice").last_used is not None
    bad = verify(core, "48213978")
    assert bad == {"ok": False, "token": "", "delay": 0.0, "own_address": "", "tts": "", "tts_cache": "",
                   "reason": "wrong"}
    fail = audit(core, "dialin-fail")[0]
    assert fail.subject == "5551234" and fail.detail["reason"] == "wrong passcode"


def test_a_caller_id_is_locked_out_but_not_everyone(core: Core, clock: Clock) -> None:
    for _ in range(5):
        assert not verify(core, "11111111", "666")["ok"]
        clock.advance(seconds=1)
    locked = verify(core, CODE, "666")
    assert not locked["ok"] and locked["reason"] == "refused", "the right passcode does not help"
    assert locked["token"] == ""
    assert len(audit(core, "dialin-lockout")) == 1
    assert audit(core, "dialin-fail")[-1].detail["reason"] == "caller ID locked out"
    assert verify(core, CODE, "777")["ok"], "another caller ID still gets in"
    clock.advance(hours=1)
    assert verify(core, CODE, "666")["ok"], "the cool-down ends"


def test_success_forgives_a_callers_earlier_mistakes(core: Core) -> None:
    for _ in range(4):
        verify(core, "11111111", "666")
    assert verify(core, CODE, "666")["ok"]
    for _ in range(4):
        verify(core, "11111111", "666")
    assert verify(core, CODE, "666")["ok"]


def test_withheld_caller_ids_share_one_counter(core: Core) -> None:
    for cid in ("", "anonymous", "Unknown", "restricted", ""):
        verify(core, "11111111", cid)
    assert verify(core, CODE, "")["reason"] == "refused"


def test_many_callers_slow_everyone_down_and_alert(core: Core, clock: Clock,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tm4.core import notify

    alerted: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(notify, "alert", lambda kind, msg, **kw: alerted.append((kind, kw)))
    delays = []
    for i in range(27):
        r = verify(core, "11111111", f"10{i}")
        delays.append(r["delay"])
        clock.advance(seconds=1)
    assert delays[:19] == [0.0] * 19
    assert delays[20:] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0], "doubling, capped at delay_max"
    legit = verify(core, CODE, "5551234")
    assert legit["ok"] and legit["delay"] == 30.0, "dial-in stays on for everyone, slowly"
    alerts = audit(core, "dialin-alert")
    assert len(alerts) == 1 and alerts[0].detail["failures"] == 21
    assert alerted == [("dialin_lockout", {"scope": "global", "failures": 21})], "the admin hears of it once"
    clock.advance(hours=1, seconds=30)
    assert verify(core, CODE, "5551234")["delay"] == 0


def test_tokens_cannot_be_forged_or_reused_elsewhere(core: Core) -> None:
    book = passcode_book(core)
    tok = verify(core)["token"]
    payload, mac = tok.split(".")
    with pytest.raises(ValidationError):
        read_token(book, payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"))
    with pytest.raises(ValidationError):
        read_token(book, tok, "9999999")
    with pytest.raises(ValidationError):
        read_token(book, "garbage")
    old = issue_token(book, "alice", "5551234", now=1000.0)
    with pytest.raises(ValidationError):
        read_token(book, old, "5551234")
    with pytest.raises(ValidationError):
        op(core, "check_address", token="x.y", address="192.0.2.7")
    with pytest.raises(ValidationError):
        op(core, "grant", token=tok, address="192.0.2.7", callerid="someone-else")


@pytest.mark.parametrize(("address", "reason"), [
    ("192.0.2.7", ""), ("127.0.0.1", "loopback"), ("198.51.100.1", "own"), ("203.0.113.200", "forbidden"),
    ("224.0.0.5", "multicast"), ("2001:db8::5", ""),
])
def test_check_address(core: Core, address: str, reason: str) -> None:
    tok = verify(core)["token"]
    assert op(core, "check_address", token=tok, address=address) == {"ok": not reason, "reason": reason}


def test_grant_makes_the_entry_and_replaces_the_previous_address(core: Core, clock: Clock) -> None:
    tok = verify(core)["token"]
    r = op(core, "grant", token=tok, address="192.0.2.7", callerid="5551234")
    e = r["entry"]
    assert e["name"] == "dialin-alice" and e["sources"] == ["192.0.2.7"] and e["origin"] == "dialin"
    assert set(e["services"]) == {"sip-udp", "sip-tcp", "sip-tls"}
    entry = core.get_entry("dialin-alice")
    assert entry.expires == clock.now + timedelta(hours=24)
    backend: MemoryKernel = core.backend  # type: ignore[assignment]
    assert "192.0.2.7" in backend.addresses()
    allow = audit(core, "allow")[-1]
    assert allow.origin == "dialin" and allow.actor == "callerid=5551234"
    tok = verify(core)["token"]
    r = op(core, "grant", token=tok, address="192.0.2.8", callerid="5551234")
    assert r["replaced"] == ["192.0.2.7"]
    assert entry_addresses(core, "dialin-alice") == ["192.0.2.8"]
    assert "192.0.2.7" not in backend.addresses() and "192.0.2.8" in backend.addresses()
    assert audit(core, "replace")[-1].subject == "dialin-alice"


def test_keep_holds_several_addresses_newest_first(core: Core) -> None:
    add_passcode(core, "bob", "31415926", keep=2, services=["sip-udp"], ttl="2h")
    for addr in ("192.0.2.101", "192.0.2.102", "192.0.2.103", "192.0.2.102"):
        tok = verify(core, "31415926", "42")["token"]
        op(core, "grant", token=tok, address=addr, callerid="42")
    assert entry_addresses(core, "dialin-bob") == ["192.0.2.102", "192.0.2.103"]
    e = core.get_entry("dialin-bob")
    assert e.services == ("sip-udp",) and e.expires == core.clock() + timedelta(hours=2)
    backend: MemoryKernel = core.backend  # type: ignore[assignment]
    assert {"192.0.2.102", "192.0.2.103"} <= backend.addresses() and "192.0.2.101" not in backend.addresses()


def test_grant_refuses_what_check_refuses(core: Core) -> None:
    tok = verify(core)["token"]
    for bad in ("127.0.0.1", "198.51.100.1", "203.0.113.200", "not-an-address"):
        with pytest.raises(ValidationError):
            op(core, "grant", token=tok, address=bad, callerid="5551234")
    assert core.store.get_entry("dialin-alice") is None


def test_grant_lifts_a_ban(core: Core) -> None:
    core.block("192.0.2.66", reason="guard", origin=Origin.GUARD)
    tok = verify(core)["token"]
    op(core, "grant", token=tok, address="192.0.2.66", callerid="5551234")
    assert core.store.get_ban("192.0.2.66") is None
    assert audit(core, "unblock")[-1].subject == "192.0.2.66"


def test_grant_never_overwrites_an_admin_entry(core: Core) -> None:
    core.allow("dialin-alice", ["192.0.2.50"], ["ssh"])
    tok = verify(core)["token"]
    with pytest.raises(ConflictError):
        op(core, "grant", token=tok, address="192.0.2.7", callerid="5551234")
    assert entry_addresses(core, "dialin-alice") == ["192.0.2.50"]


def test_deleted_passcode_cannot_grant(core: Core) -> None:
    tok = verify(core)["token"]
    passcode_book(core).delete("alice")
    with pytest.raises(ValidationError):
        op(core, "grant", token=tok, address="192.0.2.7", callerid="5551234")


@pytest.mark.parametrize(("kind", "endpoint", "remote", "expected"), [
    ("PJSIP", "anonymous", "203.0.113.9:5060", "203.0.113.9"),
    ("PJSIP", "anonymous", "[2001:db8::9]:5060", "2001:db8::9"),
    ("PJSIP", "provider-trunk", "203.0.113.9:5060", ""),
    ("Local", "anonymous", "203.0.113.9:5060", ""),
    ("PJSIP", "anonymous", "127.0.0.1:5060", ""),
    ("PJSIP", "anonymous", "203.0.113.200:5060", ""),
    ("PJSIP", "anonymous", "", ""),
])
def test_own_address_only_from_direct_endpoints(core: Core, kind: str, endpoint: str, remote: str,
                                               expected: str) -> None:
    r = verify(core, channel_type=kind, endpoint=endpoint, remote_addr=remote)
    assert r["own_address"] == expected


def test_configured_direct_endpoints(tmp_path: Path) -> None:
    c = make_core(tmp_path, {"direct_endpoints": ["1001", "1002"]})
    add_passcode(c, "alice", CODE)
    assert verify(c, channel_type="PJSIP", endpoint="1001", remote_addr="192.0.2.9:5060")["own_address"]
    assert not verify(c, channel_type="PJSIP", endpoint="anonymous", remote_addr="192.0.2.9:5060")["own_address"]


def test_external_address_from_config(core: Core) -> None:
    assert op(core, "external_address") == {"address": "198.51.100.1", "source": "config"}


def test_tts_settings_travel_with_the_session(tmp_path: Path) -> None:
    c = make_core(tmp_path, {"tts": "espeak-ng", "tts_cache": str(tmp_path / "tts")})
    add_passcode(c, "alice", CODE)
    r = verify(c)
    assert (r["tts"], r["tts_cache"]) == ("espeak-ng", str(tmp_path / "tts"))
