"""Keypad input and channel addresses: pure parsing, every refusal with a reason.

An IPv4 address is typed as digits with `*` for the dot and `#` to finish
(`203*0*113*7#`); Asterisk's GET DATA hands it over without the `#`. A SIP
channel reports its peer as `203.0.113.7:5060` or `[2001:db8::7]:5060`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from enum import StrEnum

from tm4.core.errors import ValidationError
from tm4.core.model import IPAddress, IPNetwork, never_source_reason, normalise_address

MAX_KEYS = 15  # "255*255*255*255"


class Reason(StrEnum):
    """Why an address was refused; each has its own prompt (tm4/addr-<reason>)."""

    # the keys do not spell an address
    EMPTY = "empty"
    TOO_LONG = "too-long"
    BAD_KEY = "bad-key"
    PARTS = "parts"
    EMPTY_PART = "empty-part"
    RANGE = "range"
    # an address, but not one to let in
    UNSPECIFIED = "unspecified"
    LOOPBACK = "loopback"
    MULTICAST = "multicast"
    BROADCAST = "broadcast"
    RESERVED = "reserved"
    OWN = "own"
    FORBIDDEN = "forbidden"

    @property
    def is_syntax(self) -> bool:
        return self in _SYNTAX


_SYNTAX = {Reason.EMPTY, Reason.TOO_LONG, Reason.BAD_KEY, Reason.PARTS, Reason.EMPTY_PART, Reason.RANGE}


class DtmfError(ValidationError):
    """Keys that are not an acceptable address; `reason` picks the prompt."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def address_prompts(reason: Reason | str) -> tuple[str, ...]:
    """What the caller hears for a refused address: 'not valid' + why, or just why."""
    r = Reason(reason)
    if r.is_syntax:
        return ("tm4/addr-invalid", f"tm4/addr-{r.value}")
    return (f"tm4/addr-{r.value}",)


def parse_keys(keys: str) -> ipaddress.IPv4Address:
    """Keys from GET DATA -> an IPv4 address (syntax only). Raises DtmfError, nothing else."""
    if not isinstance(keys, str):
        raise DtmfError(Reason.BAD_KEY, "keypad input must be text")
    text = keys[:-1] if keys.endswith("#") else keys
    if text == "":
        raise DtmfError(Reason.EMPTY, "no keys were pressed")
    if len(text) > MAX_KEYS:
        raise DtmfError(Reason.TOO_LONG, f"{len(text)} keys; an address is at most {MAX_KEYS}")
    bad = sorted({c for c in text if c not in "0123456789*"})
    if bad:
        raise DtmfError(Reason.BAD_KEY, f"unexpected key(s) {''.join(bad)!r}; use digits and * for the dot")
    parts = text.split("*")
    if any(p == "" for p in parts):
        where = "first" if parts[0] == "" else "last" if parts[-1] == "" else "middle"
        raise DtmfError(Reason.EMPTY_PART, f"a number is missing ({where} part of {text!r})")
    if len(parts) != 4:
        raise DtmfError(Reason.PARTS, f"{len(parts)} numbers; an address has 4")
    for i, p in enumerate(parts, 1):
        if len(p) > 3 or int(p) > 255:
            raise DtmfError(Reason.RANGE, f"number {i} is {p}; each must be 0 to 255")
    return ipaddress.IPv4Address(".".join(str(int(p)) for p in parts))


def check_address(
    addr: IPAddress,
    own: Iterable[IPAddress] = (),
    forbidden: Iterable[IPNetwork] = (),
) -> Reason | None:
    """None if `addr` may be let in; else why not."""
    a = normalise_address(addr)
    if a.is_unspecified:
        return Reason.UNSPECIFIED
    if a.is_loopback:
        return Reason.LOOPBACK
    if a.is_multicast:
        return Reason.MULTICAST
    if a == ipaddress.IPv4Address("255.255.255.255"):
        return Reason.BROADCAST
    if a.is_link_local or a.is_reserved or (a.version == 4 and a in _THIS_NETWORK):
        return Reason.RESERVED
    if never_source_reason(ipaddress.ip_network(a)) is not None:  # the core's rule, if it grows
        return Reason.RESERVED
    if any(normalise_address(o) == a for o in own):
        return Reason.OWN
    if any(a.version == n.version and a in n for n in forbidden):
        return Reason.FORBIDDEN
    return None


_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def parse_keys_checked(
    keys: str, own: Iterable[IPAddress] = (), forbidden: Iterable[IPNetwork] = ()
) -> ipaddress.IPv4Address:
    """parse_keys + check_address: an address to let in, or DtmfError with the reason."""
    addr = parse_keys(keys)
    reason = check_address(addr, own, forbidden)
    if reason is not None:
        raise DtmfError(reason, f"{addr} is refused: {reason.value}")
    return addr


_REMOTE_V6 = re.compile(r"\[([^\]]+)\](?::\d{1,5})?")
_REMOTE_V4 = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3})(?::\d{1,5})?")


def parse_remote_addr(text: str) -> IPAddress | None:
    """CHANNEL(pjsip,remote_addr) -> address: '203.0.113.7:5060', '[2001:db8::7]:5060'.

    Returns None for anything else (empty, a name, garbage): then there is no
    address to offer.
    """
    raw = (text or "").strip()
    m = _REMOTE_V6.fullmatch(raw) or _REMOTE_V4.fullmatch(raw)
    host = m.group(1) if m else raw
    host = host.split("%", 1)[0]
    try:
        return normalise_address(ipaddress.ip_address(host))
    except ValueError:
        return None


def to_keys(addr: ipaddress.IPv4Address) -> str:
    """The keys a caller types for `addr` (without the final #)."""
    return str(addr).replace(".", "*")


def spoken(addr: IPAddress | str) -> str:
    """Text for a speech engine, one symbol at a time: '2 0 3 dot 0 dot 1 1 3 dot 7'."""
    words = {".": "dot", ":": "colon"}
    return " ".join(words.get(c, c) for c in str(addr))
