"""The shapes a value of tm4.toml may have, each checked by one function.

Each shape is a small `str` subclass (an int range is `Annotated[int, Meta(...)]`): the
config dataclasses name them in their type hints, and msgspec calls `dec_hook` for each,
which runs the shape's check. A check raises ValueError/TypeError with what is wrong; the
reader (tm4.core.schema) puts the file and the key in front.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from typing import Annotated, Any

import msgspec

from tm4.core.durations import parse_duration
from tm4.core.errors import Tm4Error
from tm4.core.services import parse_ports

# -- value types: each is a str (or int) at run time, checked by its function in _CHECKS ----

class Duration(str):
    """'90s', '15m', '2h', '1d', '1w' or combined ('1h30m'): positive, at most 1000 days."""


class AbsPath(str):
    """An absolute file system path."""


class OptionalAbsPath(str):
    """An absolute file system path, or "" for none."""


class Word(str):
    """A non-empty name without spaces or control characters (user, group, endpoint)."""


class Line(str):
    """Free text on one line: no control characters (it may end up in AMI or a log)."""


class Host(str):
    """A host name or IP address."""


class HostPort(str):
    """HOST:PORT ([v6]:PORT), or "" for off."""


class OptionalHost(str):
    """A host name or IP address, or "" for none."""


class Network(str):
    """An IP address or network (CIDR)."""


class NameServer(str):
    """'192.0.2.53', '192.0.2.53:5353', '2001:db8::53' or '[2001:db8::53]:5353'."""


class Probe(str):
    """'A|AAAA|TXT NAME @server[:port] ...' (the dial-in's external address by DNS)."""


class PortSpec(str):
    """'5060', '8088-8089', '8001,8003' (a bare number too)."""


class HighRange(str):
    """One port range above 1023, e.g. '10000-20000'."""


class OptionalHighRange(str):
    """One port range above 1023, or "" for none."""


class NetnsName(str):
    """A network namespace name, or "" for the host's."""


class ServiceName(str):
    """One or more service names or TM3 codes ("sip-udp", "1 3")."""


class ServiceKey(str):
    """The name of a [services.NAME] table: lower case letters, digits, '-' and '_'."""


class ZoneKey(str):
    """A zone name ([zones.NAME], [interfaces] values): lower case letters, digits, '-', '_'."""


class AutoBool(str):
    """"auto", true or false (held as "auto", "true", "false")."""


class JailName(str):
    """A fail2ban jail's name, as in jail.conf's [sections]."""


class IfName(str):
    """A network interface name as `ip link` shows it (at most 15 characters)."""


Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Count = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Argv = Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(max_length=64)]


# -- the checks of the value types ----------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"must be a string, got {shown(v)}")
    return v


def _duration(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f'must be a duration such as "90s", "15m", "2h", "1d", got {shown(v)}')
    try:
        parse_duration(v)
    except Tm4Error as exc:
        raise ValueError(str(exc)) from None
    return v


def _abs_path(v: Any) -> str:
    s = _text(v)
    if not s.startswith("/") or "\x00" in s:
        raise ValueError(f"must be an absolute path, got {shown(v)}")
    return s


def _word(v: Any) -> str:
    s = _text(v)
    if not s or any(c.isspace() for c in s) or _CONTROL.search(s):
        raise ValueError(f"must be a name without spaces, got {shown(v)}")
    return s


def _line(v: Any) -> str:
    s = _text(v)
    if _CONTROL.search(s):
        raise ValueError(f"must not hold control characters (line breaks, tabs...), got {shown(v)}")
    return s


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _host(v: Any) -> str:
    s = _text(v)
    if not (is_ip(s) or _HOSTNAME.fullmatch(s)):
        raise ValueError(f"must be a host name or IP address, got {shown(v)}")
    return s


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'h:p', '[v6]:p', or (with a default port) 'h', '2001:db8::1', '[v6]' -> (host, port)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([^\s:\[\]]+)(?::(\d{1,5}))?|([0-9A-Fa-f:.]+)", text)
    if not m:
        raise ValueError("not HOST:PORT")
    host = m.group(1) or m.group(3) or m.group(5)
    port_text = m.group(2) or m.group(4)
    if m.group(5) and not is_ip(host):
        raise ValueError("not HOST:PORT")
    if port_text is None:
        if default_port is None:
            raise ValueError("the port is missing")
        return host, default_port
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1-65535")
    return host, port


def _host_port(v: Any) -> str:
    s = _text(v)
    if s:
        try:
            host, _ = split_host_port(s)
        except ValueError as exc:
            raise ValueError(f'must be HOST:PORT such as "127.0.0.1:4573" ({exc}), got {shown(v)}') from None
        _host(host)
    return s


def _optional_host(v: Any) -> str:
    return _host(v) if _text(v) else ""


def _network(v: Any) -> str:
    from tm4.core.model import parse_network  # the very check the dial-in makes at run time

    s = _text(v)
    try:
        parse_network(s, force=True)
    except Tm4Error as exc:
        raise ValueError(str(exc)) from None
    return s


def _nameserver(v: Any) -> str:
    s = _text(v)
    try:
        host, _ = split_host_port(s.strip(), 53)
    except ValueError:
        host = ""
    if not is_ip(host):
        raise ValueError(f'must be an IP address, optionally with ":port", got {shown(v)}')
    return s


def _probe(v: Any) -> str:
    s = _text(v)
    words = s.split()
    ok = len(words) >= 3 and words[0].upper() in ("A", "AAAA", "TXT") and bool(_HOSTNAME.fullmatch(words[1]))
    for w in words[2:] if ok else ():
        try:
            host, _ = split_host_port(w[1:], 53) if w.startswith("@") else ("", 0)
        except ValueError:
            host = ""
        ok = ok and is_ip(host)
    if not ok:
        raise ValueError(f'must be "A|AAAA|TXT NAME @server[:port] ...", got {shown(v)}')
    return s


def _port_spec(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise TypeError(f'must be ports such as "5060", "8088-8089" or "8001,8003", got {shown(v)}')
    if v == "":
        return v
    try:
        parse_ports(v)
    except Tm4Error:
        raise ValueError(f'must be ports between 1 and 65535 such as "5060", "8088-8089" or "8001,8003", '
                         f"got {shown(v)}") from None
    return str(v)


def _high_range(v: Any, *, empty_ok: bool = False) -> str:
    s = _text(v)
    if empty_ok and not s:
        return s
    try:
        ranges = parse_ports(s)
    except Tm4Error:
        ranges = ()
    if len(ranges) != 1 or ranges[0][0] < 1024:
        raise ValueError(f'must be one range of ports above 1023 such as "10000-20000", got {shown(v)}')
    return s


def _netns(v: Any) -> str:
    s = _text(v)
    if s and (s in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", s)):
        raise ValueError(f"must be a network namespace name, got {shown(v)}")
    return s


def _service_name(v: Any) -> str:
    s = _text(v)
    # digits are Travelin' Man 3 codes; "," and spaces separate several in one string
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_, -]{0,63}", s):
        raise ValueError(f"must be a service name such as \"sip-udp\", got {shown(v)}")
    return s


def _service_key(v: Any) -> str:
    s = _text(v)
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", s):
        raise ValueError(f"a service name must be lower case letters, digits, '-' or '_', got {shown(v)}")
    return s


_CHECKS: dict[type, Callable[[Any], Any]] = {
    Duration: _duration,
    AbsPath: _abs_path,
    OptionalAbsPath: lambda v: _abs_path(v) if _text(v) else "",
    Word: _word,
    Line: _line,
    Host: _host,
    HostPort: _host_port,
    OptionalHost: _optional_host,
    Network: _network,
    NameServer: _nameserver,
    Probe: _probe,
    PortSpec: _port_spec,
    HighRange: _high_range,
    OptionalHighRange: lambda v: _high_range(v, empty_ok=True),
    NetnsName: _netns,
    ServiceName: _service_name,
    ServiceKey: _service_key,
    ZoneKey: lambda v: _pattern(v, r"[a-z][a-z0-9_-]{0,31}", "a zone name must be lower case letters, digits, "
                                "'-' or '_'"),
    AutoBool: lambda v: _auto_bool(v),
    JailName: lambda v: _pattern(v, r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", "a jail name must be letters, digits, "
                                 "'_', '.' or '-' (at most 64)"),
    IfName: lambda v: _pattern(v, r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}", "an interface name must be 1-15 "
                               "letters, digits, '_', '.', '@' or '-'"),
}


def _auto_bool(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v == "auto":
        return v
    raise ValueError(f'must be "auto", true or false, got {shown(v)}')


def _pattern(v: Any, pattern: str, what: str) -> str:
    s = _text(v)
    if not re.fullmatch(pattern, s):
        raise ValueError(f"{what}, got {shown(v)}")
    return s


def dec_hook(tp: type, value: Any) -> Any:
    check = _CHECKS.get(tp)
    if check is None:
        raise NotImplementedError(tp)
    return tp(check(value))  # a str as the file has it (msgspec wants an instance of `tp`)


def shown(value: Any) -> str:
    """A value as an error message shows it: TOML-like, short, control characters escaped."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a table"
    else:
        try:
            text = json.dumps(value, ensure_ascii=True, default=str)
        except ValueError:  # nan
            text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


