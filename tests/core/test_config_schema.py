"""The config schema against hostile files: whatever a file holds, reading it ends in a
Config whose every value the rest of tm4 can use, or in one ConfigError naming the key."""

from __future__ import annotations

import dataclasses
import datetime
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tm4.core import config as config_mod
from tm4.core import schema
from tm4.core.config import SECTIONS, Config, load_config, parse_config
from tm4.core.durations import parse_duration
from tm4.core.errors import ConfigError
from tm4.core.services import parse_ports

KNOWN_KEYS: dict[str, list[str]] = {
    name: [f.name for f in dataclasses.fields(tp)] for name, tp in SECTIONS.items()
    if isinstance(tp, type) and dataclasses.is_dataclass(tp)
}

text = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", "60s", "-5m", "0s", "1001d", "1h30m", "10000-20000", "80-90", "192.0.2.1", "2001:db8::/32",
     "not-a-net", "sip-udp", "1 3", "tcp", "udp", "nft", "127.0.0.1:4573", "[::1]:53", "a\r\nb", "\x1b[2J",
     "/abs/path", "rel/path", "espeak-ng", "A x.example @192.0.2.53", "5060", "8001,8003", "70000"])
scalar = (st.integers() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70) | st.booleans()
          | st.floats(allow_nan=True) | text | st.datetimes() | st.dates() | st.times())
value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(text, inner, max_size=3), max_leaves=8)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly known sections and keys (so the checks behind the type gate are reached)."""
    doc: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from([*SECTIONS, "bogus"]), max_size=4, unique=True)):
        if name in KNOWN_KEYS and draw(st.booleans()):
            keys = draw(st.lists(st.sampled_from(KNOWN_KEYS[name]), max_size=4, unique=True))
            defaults = dataclasses.asdict(SECTIONS[name]())
            # most keys keep their default, so a document often passes all but one check
            doc[name] = {k: draw(st.just(defaults[k]) | value | text) for k in keys}
        elif name == "services":
            doc[name] = draw(st.dictionaries(st.sampled_from(["sip-udp", "x", "Bad Name", "all"]),
                                             st.dictionaries(st.sampled_from(["proto", "ports", "description",
                                                                              "extra"]), value, max_size=3),
                                             max_size=2))
        else:
            doc[name] = draw(value)
    return doc


def _usable(cfg: Config) -> None:
    """What an accepted file promises the readers of Config."""
    for name, tp in SECTIONS.items():
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            continue
        section = getattr(cfg, name)
        for f in dataclasses.fields(tp):
            hint = typing.get_type_hints(tp, include_extras=True)[f.name]
            got = getattr(section, f.name)
            base = schema._strip(hint)
            if base is config_mod.Duration:
                parse_duration(got)
            elif typing.get_origin(base) is list and schema._strip(typing.get_args(base)[0]) is config_mod.Duration:
                for d in got:
                    parse_duration(d)
            elif base is int:
                assert isinstance(got, int) and not isinstance(got, bool)
                lo, hi = schema._bounds(hint)
                assert (lo is None or got >= lo) and (hi is None or got <= hi)
    cfg.rtp_range()
    for svc in cfg.services.values():
        for lo, hi in svc.ports:
            assert 1 <= lo <= hi <= 65535


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
@example({"firewall": {"\r": 0}})  # found by CI: an unknown key's name split the error line
def test_any_document_gives_a_usable_config_or_one_config_error(doc: dict[str, Any]) -> None:
    try:
        cfg = parse_config(doc, Path("/etc/tm4/tm4.toml"))
    except ConfigError as exc:
        msg = str(exc)
        assert msg.startswith("/etc/tm4/tm4.toml: ") and "\n" not in msg and "\r" not in msg
        return
    _usable(cfg)


toml_line = st.one_of(
    st.sampled_from(["[guard]", "[ami]", "[services.sip-udp]", "[[guard]]", "[dialin]", "[", "= 1", "a.b.c = 1",
                     'window = "60s"', "failures = 0", "port = 70000", "bans = [{}]", "bans = [[1]]",
                     "rate_packets = 99999999999999999999", 'forbidden = ["not-a-net"]', "x = nan", "y = inf",
                     "d = 1979-05-27T07:32:00Z", 'k = """multi\nline"""', "t = {a = {b = 1}}"]),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(sorted({k for ks in KNOWN_KEYS.values() for k in ks})),
              st.sampled_from(["0", "-1", "1", "true", '"x"', '""', "[]", "[1, 2]", '["a"]', "{}", "1.5",
                               '"-5m"', '"0s"', '"\\u001b[2J"', '"a\\nb"'])),
    st.text(max_size=20),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(toml_line, max_size=8), st.binary(max_size=8))
def test_any_file_gives_a_config_or_one_config_error(tmp_path_factory: pytest.TempPathFactory,
                                                     lines: list[str], junk: bytes) -> None:
    f = tmp_path_factory.mktemp("cfg") / "tm4.toml"
    f.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + junk)
    try:
        cfg = load_config(f)
    except ConfigError as exc:
        assert str(exc).count("\n") == 0 and str(f) in str(exc)
        return
    _usable(cfg)


def test_errors_name_the_key_and_say_what_was_found() -> None:
    cases = {
        "[guard] failures: must be at least 1, got 0": {"guard": {"failures": 0}},
        "[ami] port: must be at most 65535, got 70000": {"ami": {"port": 70000}},
        "[guard] bans[1]: not a duration: '-1h'": {"guard": {"bans": ["1h", "-1h"]}},
        "[guard] window: must be a duration such as": {"guard": {"window": datetime.date(2026, 1, 1)}},
        "[guard] ipv6_prefix: must be 32 to 128, got 8": {"guard": {"ipv6_prefix": 8}},
        "[firewall] backend: must be 'nft' or 'iptables', got \"pf\"": {"firewall": {"backend": "pf"}},
        "[ami] secret: must not hold control characters (line breaks, tabs...), got \"a\\u001b[2J\"":
            {"ami": {"secret": "a\x1b[2J"}},
    }
    for want, doc in cases.items():
        with pytest.raises(ConfigError) as exc:
            parse_config(doc, Path("/etc/tm4/tm4.toml"))
        assert str(exc.value) == f"/etc/tm4/tm4.toml: {want}" or str(exc.value).startswith(
            f"/etc/tm4/tm4.toml: {want}"), str(exc.value)


def test_values_keep_their_types_for_the_readers() -> None:
    cfg = parse_config({"guard": {"failures": 3, "window": "2m", "bans": ["1h"]},
                        "dns": {"nameservers": ["192.0.2.53:5353", "[2001:db8::53]:53", "2001:db8::54"]},
                        "daemon": {"fastagi": "[::1]:4573"}, "firewall": {"rtp": ""},
                        "services": {"sip-udp": {"ports": 5062}}})
    assert cfg.guard.failures == 3 and cfg.guard.window == "2m" and cfg.guard.bans == ["1h"]
    assert isinstance(cfg.guard.window, str) and cfg.rtp_range() is None
    assert cfg.services["sip-udp"].ports == ((5062, 5062),)
    assert parse_ports("5062") == cfg.services["sip-udp"].ports


def test_the_classic_agi_does_not_load_the_config_schema() -> None:
    """The AGI's cold start stays small: it never needs msgspec or the config schema."""
    code = ("import sys, tm4.dialin.agi, tm4.dialin.client; "
            "print(','.join(m for m in ('msgspec', 'tm4.core.config') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
