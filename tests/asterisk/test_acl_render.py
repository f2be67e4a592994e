"""The whitelist rendered as an Asterisk named ACL: golden files, and what
Asterisk would decide with the rendered rules (last match wins, default allow).

Regenerate the golden files after a deliberate change with TM4_UPDATE_GOLDEN=1."""

from __future__ import annotations

import ipaddress
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tm4.asterisk.acl import (
    desired_rules,
    parse_acl_show,
    parse_rule,
    permits,
    render_acl,
    rules_in_conf,
)
from tm4.core.model import Entry, Source

GOLDEN = Path(__file__).parent.parent / "golden" / "acl"
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def entry(name: str, sources: list[str], services: list[str], *, expires: datetime | None = None,
          resolved: dict[str, list[str]] | None = None) -> Entry:
    return Entry(
        name=name, sources=tuple(Source.parse(s) for s in sources), services=tuple(services),
        created=NOW - timedelta(days=1), expires=expires,
        resolved={k: tuple(ipaddress.ip_network(a) for a in v) for k, v in (resolved or {}).items()},
    )


CASES: dict[str, list[Entry]] = {
    "ipv4": [
        entry("office", ["192.0.2.10"], ["sip-udp"]),
        entry("provider", ["198.51.100.7"], ["sip-udp", "sip-tcp"]),
        entry("webadmin", ["203.0.113.9"], ["https", "ssh"]),  # no SIP/IAX: not in the ACL
    ],
    "ipv6": [
        entry("roadwarrior", ["2001:db8:1::5"], ["sip-tls"]),
        entry("branch", ["2001:db8:2::/48"], ["iax"]),
    ],
    "cidr": [
        entry("office-lan", ["192.0.2.0/24"], ["sip-udp"]),
        entry("desk", ["192.0.2.77"], ["sip-udp"]),  # inside the /24: merged away
        entry("carrier", ["198.51.100.0/25", "198.51.100.128/25"], ["sip-udp"]),  # adjacent: one /24
        entry("lab", ["203.0.113.64/26"], ["all"]),
    ],
    "mixed": [
        entry("office", ["192.0.2.10", "2001:db8::10"], ["sip-udp", "http"]),
        entry("ddns", ["home.example.com"], ["sip-udp"],
              resolved={"home.example.com": ["203.0.113.5/32", "2001:db8:5::1/128"]}),
        entry("never", ["new.example.net"], ["sip-udp"]),  # not resolved yet: nothing
        entry("expired", ["198.51.100.99"], ["sip-udp"], expires=NOW - timedelta(minutes=1)),
        entry("dialin", ["198.51.100.20"], ["sip-udp", "sip-tcp", "sip-tls"], expires=NOW + timedelta(hours=24)),
        entry("trunk", ["198.51.100.0/28"], ["iax"]),
        entry("ssh-only", ["203.0.113.200"], ["ssh"]),
    ],
    "empty": [],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    text = render_acl(CASES[case], NOW)
    path = GOLDEN / f"{case}.conf"
    if os.environ.get("TM4_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{case}: rendered ACL differs from {path}"


def test_every_golden_file_has_a_case() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.conf")) == sorted(CASES)


def test_rendering_is_deterministic_and_carries_no_timestamp() -> None:
    a = render_acl(CASES["mixed"], NOW)
    b = render_acl(list(reversed(CASES["mixed"])), NOW + timedelta(hours=1))
    assert a == b


def test_deny_everything_first_then_permit() -> None:
    rules = rules_in_conf(render_acl(CASES["mixed"], NOW))
    assert [s for s, _ in rules[:2]] == ["deny", "deny"]
    assert {str(n) for _, n in rules[:2]} == {"0.0.0.0/0", "::/0"}
    assert all(s == "permit" for s, _ in rules[2:])
    assert rules == desired_rules(CASES["mixed"], NOW)


@pytest.mark.parametrize("address,allowed", [
    ("192.0.2.10", True), ("2001:db8::10", True),  # office, both families
    ("203.0.113.5", True), ("2001:db8:5::1", True),  # resolved DNS name
    ("198.51.100.20", True),  # dial-in grant still running
    ("198.51.100.9", True),  # trunk /28
    ("198.51.100.99", False),  # expired
    ("198.51.100.16", False),  # just outside the /28
    ("203.0.113.200", False),  # ssh only
    ("192.0.2.11", False), ("2001:db8::11", False),
    ("::ffff:192.0.2.10", True), ("::ffff:192.0.2.11", False),  # IPv4-mapped sources
])
def test_what_asterisk_would_decide(address: str, allowed: bool) -> None:
    rules = rules_in_conf(render_acl(CASES["mixed"], NOW))
    assert permits(rules, address) is allowed


def test_asterisk_semantics_need_both_deny_lines() -> None:
    """Why `deny = ::/0` is there: an IPv4 rule never matches an IPv6 source, and an
    address no rule matches is allowed."""
    only_v4 = [("deny", ipaddress.ip_network("0.0.0.0/0")), ("permit", ipaddress.ip_network("192.0.2.10/32"))]
    assert permits(only_v4, "2001:db8::99") is True
    assert permits(only_v4, "192.0.2.99") is False
    # last match wins: a later deny overrides an earlier permit
    assert permits([("permit", ipaddress.ip_network("192.0.2.0/24")),
                    ("deny", ipaddress.ip_network("192.0.2.10/32"))], "192.0.2.10") is False


def test_empty_whitelist_rejects_everyone() -> None:
    rules = rules_in_conf(render_acl([], NOW))
    assert not permits(rules, "192.0.2.1") and not permits(rules, "2001:db8::1")


def test_parse_rule_spellings() -> None:
    assert str(parse_rule("192.0.2.0/255.255.255.0")) == "192.0.2.0/24"
    assert str(parse_rule("192.0.2.7")) == "192.0.2.7/32"
    assert str(parse_rule("2001:db8::/ffff:ffff::")) == "2001:db8::/32"
    assert str(parse_rule("::/::")) == "::/0"
    with pytest.raises(ValueError):
        parse_rule("192.0.2.0/255.0.255.0")


def test_parse_acl_show_output() -> None:
    lines = ["", "ACL: tm4", "---------------------------------------------",
             "  0:  deny - 0.0.0.0/0.0.0.0", "  1:  deny - ::/::",
             "  2: allow - 192.0.2.10/255.255.255.255", "  3: allow - 2001:db8::/ffff:ffff::"]
    assert [(s, str(n)) for s, n in parse_acl_show(lines) or []] == [
        ("deny", "0.0.0.0/0"), ("deny", "::/0"), ("permit", "192.0.2.10/32"), ("permit", "2001:db8::/32")]
    assert parse_acl_show(["", "Could not find ACL named 'tm4'"]) is None
