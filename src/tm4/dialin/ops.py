"""The dial-in operations: all the Asterisk group may ask of tm4d.

Each is a plain function (core, args) -> JSON object; tm4d dispatches
`DIALIN_OPS` from its control socket, FastAGI and the root fallback call them
in-process. Nothing here trusts the caller: the passcode is checked here, the
rate limits are counted here, and the grant needs a session token that only a
right passcode yields (HMAC-signed, bound to the caller ID, 15 minutes).

  dialin.verify           {passcode, callerid, channel_type?, endpoint?, remote_addr?}
                          -> {ok, token, delay, own_address, tts, tts_cache, reason}
  dialin.check_address    {token, address} -> {ok, reason}
  dialin.grant            {token, address, callerid} -> {entry, replaced}
  dialin.external_address {} -> {address, source}
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import secrets
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from tm4.core.durations import parse_duration
from tm4.core.errors import ConflictError, NotFoundError, ValidationError
from tm4.core.model import IPAddress, IPNetwork, Origin, parse_network
from tm4.dialin.dtmf import Reason, check_address, parse_remote_addr
from tm4.dialin.external_ip import CACHE_KEY, ExternalAddress
from tm4.dialin.limits import DialinLimits, normalise_callerid
from tm4.dialin.passcodes import Passcode, PasscodeBook
from tm4.ops.engine import Core

TOKEN_TTL = 15 * 60
_TOKEN_LABEL = b"tm4-dialin-session\x00"

OpFunc = Callable[[Core, dict[str, Any]], dict[str, Any]]

_books: weakref.WeakKeyDictionary[Core, PasscodeBook] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def passcode_book(core: Core) -> PasscodeBook:
    with _lock:
        book = _books.get(core)
        if book is None:
            book = PasscodeBook.open(core.store, core.config.state_dir, core.clock)
            _books[core] = book
        return book


# -- session tokens ------------------------------------------------------------------

def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _token_key(book: PasscodeBook) -> bytes:
    return hmac.new(book.key, _TOKEN_LABEL, hashlib.sha256).digest()


def issue_token(book: PasscodeBook, owner: str, callerid: str, now: float | None = None) -> str:
    payload = json.dumps({"o": owner, "c": callerid, "e": int((now or time.time()) + TOKEN_TTL),
                          "n": secrets.token_hex(8)}, separators=(",", ":")).encode()
    mac = hmac.new(_token_key(book), payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


def read_token(book: PasscodeBook, token: str, callerid: str | None = None,
               now: float | None = None) -> str:
    """The owner a token was issued for; ValidationError if forged, expired or another caller's."""
    bad = ValidationError("the dial-in session is invalid or has expired; call again")
    if not isinstance(token, str) or token.count(".") != 1:
        raise bad
    try:
        payload, mac = (_unb64(p) for p in token.split("."))
    except ValueError:
        raise bad from None
    if not hmac.compare_digest(hmac.new(_token_key(book), payload, hashlib.sha256).digest(), mac):
        raise bad
    data = json.loads(payload)
    if data["e"] < (now or time.time()):
        raise bad
    if callerid is not None and normalise_callerid(callerid) != data["c"]:
        raise bad
    return str(data["o"])


# -- which addresses may be let in ----------------------------------------------------

_local_cache: dict[str, tuple[float, list[IPAddress]]] = {}


def local_addresses(netns: str = "") -> list[IPAddress]:
    """The server's own interface addresses (in tm4's network namespace), cached 30 s."""
    hit = _local_cache.get(netns)
    if hit and time.monotonic() - hit[0] < 30:
        return hit[1]
    argv = ["ip", *(["-n", netns] if netns else []), "-j", "addr", "show"]
    found: list[IPAddress] = []
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True).stdout
        for link in json.loads(out or "[]"):
            for info in link.get("addr_info", []):
                try:
                    found.append(ipaddress.ip_address(info["local"]))
                except (KeyError, ValueError):
                    continue
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    _local_cache[netns] = (time.monotonic(), found)
    return found


def own_addresses(core: Core) -> list[IPAddress]:
    own = list(local_addresses(core.config.firewall.netns))
    ext = core.config.dialin.external_address.strip()
    for text in (ext, _cached_external(core)):
        with contextlib.suppress(ValueError):
            own.append(ipaddress.ip_address(text))
    return own


def _cached_external(core: Core) -> str:
    raw = core.store.get_meta(CACHE_KEY) or ""
    try:
        return str(json.loads(raw).get("address") or "") if raw else ""
    except (ValueError, AttributeError):
        return ""


def forbidden_networks(core: Core) -> list[IPNetwork]:
    return [parse_network(f, force=True) for f in core.config.dialin.forbidden]


def refusal(core: Core, addr: IPAddress) -> Reason | None:
    return check_address(addr, own_addresses(core), forbidden_networks(core))


def _address(args: dict[str, Any]) -> IPAddress:
    text = args.get("address")
    if not isinstance(text, str):
        raise ValidationError("argument 'address' must be a string")
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValidationError(f"{text!r} is not an IP address") from None


def _text(args: dict[str, Any], key: str) -> str:
    v = args.get(key, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValidationError(f"argument {key!r} must be a string")
    return v


# -- the operations -------------------------------------------------------------------

def op_verify(core: Core, args: dict[str, Any]) -> dict[str, Any]:
    passcode = _text(args, "passcode")[:64]
    callerid = normalise_callerid(_text(args, "callerid"))
    book = passcode_book(core)
    limits = DialinLimits(core)
    before = limits.check(callerid)
    if not before.allowed:
        book.verify("")  # the same cost and the same answer as a wrong passcode
        after = limits.record_failure(callerid, "caller ID locked out", before)
        return _rejected("refused", after.delay)
    owner = book.verify(passcode)
    if owner is None:
        after = limits.record_failure(callerid, "wrong passcode" if passcode else "empty", before)
        return _rejected("wrong", after.delay)
    limits.record_success(callerid)
    book.mark_used(owner.owner)
    core.audit("dialin-verify", owner.entry_name, Origin.DIALIN, f"callerid={callerid}", owner=owner.owner)
    d = core.config.dialin
    return {
        "ok": True,
        "token": issue_token(book, owner.owner, callerid),
        "delay": before.delay,
        "own_address": _own_call_address(core, args),
        "tts": d.tts,
        "tts_cache": d.tts_cache,
        "reason": "",
    }


def _rejected(reason: str, delay: float) -> dict[str, Any]:
    return {"ok": False, "token": "", "delay": delay, "own_address": "", "tts": "", "tts_cache": "",
            "reason": reason}


def _own_call_address(core: Core, args: dict[str, Any]) -> str:
    """The caller's own address, if the call comes straight from one of the direct endpoints."""
    if _text(args, "channel_type").upper() != "PJSIP":
        return ""
    if _text(args, "endpoint") not in core.config.dialin.direct_endpoints:
        return ""
    addr = parse_remote_addr(_text(args, "remote_addr"))
    if addr is None or refusal(core, addr) is not None:
        return ""
    return str(addr)


def op_check_address(core: Core, args: dict[str, Any]) -> dict[str, Any]:
    read_token(passcode_book(core), _text(args, "token"))
    reason = refusal(core, _address(args))
    return {"ok": reason is None, "reason": reason.value if reason else ""}


def op_grant(core: Core, args: dict[str, Any]) -> dict[str, Any]:
    book = passcode_book(core)
    callerid = _text(args, "callerid")
    owner = read_token(book, _text(args, "token"), callerid)
    addr = _address(args)
    reason = refusal(core, addr)
    if reason is not None:
        raise ValidationError(f"{addr} may not be let in ({reason.value})")
    try:
        pc = book.get(owner)
    except NotFoundError:
        raise ValidationError("that passcode was deleted meanwhile") from None
    cid = normalise_callerid(callerid)
    with core.store.transaction():
        old = core.store.get_entry(pc.entry_name)
        if old is not None and old.origin != Origin.DIALIN:
            raise ConflictError(f"{pc.entry_name} exists and was not made by dial-in; not replaced")
        kept = _kept(old.sources if old else (), str(addr), pc)
        entry = core.allow(
            pc.entry_name, [str(addr), *kept], list(pc.services or core.config.dialin.grant_services),
            ttl=parse_duration(pc.ttl or core.config.dialin.grant_ttl),
            note=f"dial-in by {pc.owner} from caller ID {cid}", origin=Origin.DIALIN,
            actor=f"callerid={cid}", replace=True, endpoints=pc.endpoints,
        )
    replaced = [s.text for s in (old.sources if old else ()) if s.text not in {str(addr), *kept}]
    return {"entry": entry.to_json(), "replaced": replaced}


def _kept(sources: Iterable[Any], new: str, pc: Passcode) -> list[str]:
    """The owner's previous addresses that stay (newest first), up to keep-1 of them."""
    out: list[str] = []
    for s in sources:
        if s.text != new and s.text not in out:
            out.append(s.text)
    return out[: max(0, pc.keep - 1)]


def op_external_address(core: Core, args: dict[str, Any]) -> dict[str, Any]:
    addr, source = ExternalAddress(core.config, core.store, core.clock).get()
    return {"address": addr or "", "source": source}


DIALIN_OPS: dict[str, OpFunc] = {
    "dialin.verify": op_verify,
    "dialin.check_address": op_check_address,
    "dialin.grant": op_grant,
    "dialin.external_address": op_external_address,
}
