"""AMI framing and Asterisk's security events, as typed values. Pure: no I/O.

Framing (manager.c): a banner line `Asterisk Call Manager/X.Y.Z\\r\\n`, then
messages made of `Key: Value\\r\\n` lines closed by an empty line. Values may be
empty (`ExpectedResponse: \\r\\n`), keys may repeat, and order matters: both are
kept here, unlike panoramisk 1.4, which strips the message and so drops a
trailing empty header.

Security events (main/security_events.c) carry EventTV, Severity, Service,
EventVersion, AccountID, SessionID, LocalAddress and RemoteAddress, then fields
of their own. Addresses look like `IPV4/UDP/203.0.113.9/5060` or
`IPV6/UDP/2001:db8::5/5060` (no brackets); the transport may be absent.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from tm4.core.errors import ValidationError
from tm4.core.model import IPAddress, normalise_address

BANNER_PREFIX = b"Asterisk Call Manager/"
EOL = b"\r\n"
EOM = b"\r\n\r\n"
# A peer that never closes a message must not make us buffer forever.
MAX_MESSAGE = 256 * 1024
MAX_BANNER = 1024

Headers = tuple[tuple[str, str], ...]


class EventType(StrEnum):
    FAILED_ACL = "FailedACL"
    INVALID_ACCOUNT_ID = "InvalidAccountID"
    SESSION_LIMIT = "SessionLimit"
    MEMORY_LIMIT = "MemoryLimit"
    LOAD_AVERAGE_LIMIT = "LoadAverageLimit"
    REQUEST_NOT_SUPPORTED = "RequestNotSupported"
    REQUEST_NOT_ALLOWED = "RequestNotAllowed"
    AUTH_METHOD_NOT_ALLOWED = "AuthMethodNotAllowed"
    REQUEST_BAD_FORMAT = "RequestBadFormat"
    SUCCESSFUL_AUTH = "SuccessfulAuth"
    UNEXPECTED_ADDRESS = "UnexpectedAddress"
    CHALLENGE_RESPONSE_FAILED = "ChallengeResponseFailed"
    INVALID_PASSWORD = "InvalidPassword"
    CHALLENGE_SENT = "ChallengeSent"
    INVALID_TRANSPORT = "InvalidTransport"


SECURITY_EVENTS: dict[str, EventType] = {t.value: t for t in EventType}
# Severity as Asterisk assigns it (sec_events[] in main/security_events.c).
INFORMATIONAL = frozenset({EventType.SUCCESSFUL_AUTH, EventType.CHALLENGE_SENT})
# Services whose failures are attempts on the PBX (not, say, an HTTP module's).
GUARDED_SERVICES = frozenset({"PJSIP", "SIP", "IAX2", "AMI"})


@dataclass(frozen=True, slots=True)
class Frame:
    """One AMI message: its headers in wire order, with empty values and repeats kept."""

    headers: Headers

    def get(self, key: str, default: str | None = None) -> str | None:
        k = key.lower()
        for name, value in self.headers:
            if name.lower() == k:
                return value
        return default

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    @property
    def event(self) -> str | None:
        h = self.headers
        if h and h[0][0] == "Event":  # Asterisk always puts Event first
            return h[0][1]
        return self.get("Event")

    @property
    def response(self) -> str | None:
        return self.get("Response")

    def to_bytes(self) -> bytes:
        return b"".join(f"{k}: {v}".encode() + EOL for k, v in self.headers) + EOL


class FrameParser:
    """Incremental AMI deframer: feed bytes as they arrive, get whole messages back.

    A partial message stays buffered until its closing empty line arrives; a
    connection that dies mid-message leaves it here, never half-parsed. What is
    buffered is bounded (MAX_MESSAGE, MAX_BANNER), and each byte is searched for an
    end once, so a peer that drips a huge message byte by byte costs linear time.
    """

    def __init__(self, *, expect_banner: bool = True) -> None:
        self._buf = bytearray()
        self.banner: str | None = None
        self._want_banner = expect_banner

    @property
    def pending(self) -> int:
        """Bytes of an unfinished message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        start = max(0, len(buf) - len(EOM) + 1)  # an end not seen before needs a new byte
        buf += data
        if self._want_banner:
            if len(buf) < len(BANNER_PREFIX) and BANNER_PREFIX.startswith(bytes(buf)):
                return []
            if buf.startswith(BANNER_PREFIX):
                end = buf.find(EOL)
                if end < 0:
                    if len(buf) > MAX_BANNER:
                        raise ValidationError(f"AMI banner longer than {MAX_BANNER} bytes without an end")
                    return []
                self.banner = buf[:end].decode("utf-8", "replace")
                del buf[:end + 2]
            self._want_banner = False
            start = 0
        frames: list[Frame] = []
        pos = 0
        while (end := buf.find(EOM, max(pos, start))) >= 0:
            if end > pos:
                frames.append(parse_frame(bytes(buf[pos:end])))
            pos = end + len(EOM)
        if pos:
            del buf[:pos]
        if len(buf) > MAX_MESSAGE:
            raise ValidationError(f"AMI message longer than {MAX_MESSAGE} bytes without an end")
        return frames


def parse_frame(raw: bytes) -> Frame:
    """`Key: Value` lines (without the closing empty line) into a Frame."""
    headers: list[tuple[str, str]] = []
    append = headers.append
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        key, sep, value = line.partition(": ")
        if not sep:
            key, sep, value = line.partition(":")
            if not sep:
                continue  # not a header (Asterisk sends none such in events)
        append((key, value))
    return Frame(tuple(headers))


# -- addresses -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Endpoint:
    """A security event address: IPV4/UDP/203.0.113.9/5060."""

    address: IPAddress
    port: int | None = None
    transport: str | None = None

    def __str__(self) -> str:
        fam = "IPV4" if self.address.version == 4 else "IPV6"
        parts = [fam] + ([self.transport] if self.transport else []) + [str(self.address)]
        if self.port is not None:
            parts.append(str(self.port))
        return "/".join(parts)


@lru_cache(maxsize=65536)  # a flood repeats the same few addresses; Endpoint is immutable
def parse_endpoint(text: str) -> Endpoint:
    """`IPV4/UDP/203.0.113.9/5060`, `IPV6/UDP/2001:db8::5/5060`, `IPV4/203.0.113.9/5060`.

    IPv4-mapped IPv6 becomes the IPv4 address it carries; brackets are tolerated.
    """
    parts = text.strip().split("/")
    if len(parts) < 2 or parts[0].upper() not in ("IPV4", "IPV6"):
        raise ValidationError(f"not an Asterisk security event address: {text!r}")
    rest = parts[1:]
    transport: str | None = None
    port: int | None = None
    if len(rest) >= 2 and rest[-1].isascii() and rest[-1].isdigit():  # not '²'
        port = int(rest.pop())
        if port > 65535:
            raise ValidationError(f"port out of range in {text!r}")
    if len(rest) == 2:
        transport = rest.pop(0).upper() or None
    if len(rest) != 1:
        raise ValidationError(f"not an Asterisk security event address: {text!r}")
    host = rest[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise ValidationError(f"bad address {host!r} in {text!r}") from None
    return Endpoint(normalise_address(addr), port, transport)


# -- events --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SecurityEvent:
    type: EventType
    severity: str
    service: str
    account: str
    session: str
    remote: Endpoint | None
    local: Endpoint | None
    frame: Frame

    @property
    def is_error(self) -> bool:
        return self.severity == "Error"

    @property
    def is_failure(self) -> bool:
        """A failed attempt on the PBX: an Error from PJSIP, SIP, IAX2 or AMI."""
        return self.severity == "Error" and self.service in GUARDED_SERVICES

    @property
    def using_password(self) -> bool:
        return self.frame.get("UsingPassword") == "1"

    def field(self, name: str) -> str | None:
        return self.frame.get(name)


def to_security_event(frame: Frame) -> SecurityEvent | None:
    """The typed event, or None for a frame that is not one of the 15 security events.

    An address that does not parse leaves `remote` None (the event is still
    reported, never acted on).
    """
    name = frame.event
    etype = SECURITY_EVENTS.get(name) if name else None
    if etype is None:
        return None
    values = dict(reversed(frame.headers))  # the first of repeated headers wins
    remote = _endpoint_or_none(values.get("RemoteAddress"))
    local = _endpoint_or_none(values.get("LocalAddress"))
    severity = values.get("Severity") or ("Informational" if etype in INFORMATIONAL else "Error")
    return SecurityEvent(
        type=etype,
        severity=severity,
        service=values.get("Service", ""),
        account=values.get("AccountID", ""),
        session=values.get("SessionID", ""),
        remote=remote,
        local=local,
        frame=frame,
    )


def _endpoint_or_none(text: str | None) -> Endpoint | None:
    if not text:
        return None
    try:
        return parse_endpoint(text)
    except ValidationError:
        return None


def parse_events(data: bytes) -> list[SecurityEvent]:
    """Every security event in a byte stream (a capture file, a replay)."""
    parser = FrameParser()
    out: list[SecurityEvent] = []
    for frame in parser.feed(data):
        ev = to_security_event(frame)
        if ev is not None:
            out.append(ev)
    return out
