"""Model validation: every refusal has a test, and what must pass does."""

from __future__ import annotations

import ipaddress
from datetime import timedelta

import pytest

from tm4.core.durations import format_duration, parse_duration
from tm4.core.errors import ValidationError
from tm4.core.model import Source, parse_network, validate_fqdn, validate_name
from tm4.core.services import build_catalogue, parse_ports, resolve_services


@pytest.mark.parametrize("text,why", [
    ("0.0.0.0/0", "whole internet"),
    ("::/0", "whole internet"),
    ("10.0.0.0/7", "shorter than /8"),
    ("2001::/16", "shorter than /32"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("255.255.255.255", "broadcast"),
    ("192.0.2.1/24", "host bits"),
    ("300.1.2.3", "not an IPv4/IPv6"),
    ("1.2.3", "not an IPv4/IPv6"),
    ("192.0.2.0/33", "not an IPv4/IPv6"),
])
def test_dangerous_or_meaningless_networks_are_refused_with_reason(text: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        parse_network(text)


def test_force_allows_wide_networks_but_never_multicast() -> None:
    assert str(parse_network("0.0.0.0/0", force=True)) == "0.0.0.0/0"
    assert str(parse_network("10.0.0.0/7", force=True)) == "10.0.0.0/7"
    with pytest.raises(ValidationError, match="multicast"):
        parse_network("224.0.0.1", force=True)


@pytest.mark.parametrize("text", ["192.0.2.7", "198.51.100.0/24", "203.0.113.9", "10.1.2.0/24",
                                  "2001:db8::5", "2001:db8::/48", "fe80::1"])
def test_private_and_documentation_ranges_are_accepted(text: str) -> None:
    assert parse_network(text)


def test_ipv4_mapped_ipv6_is_normalised_to_ipv4() -> None:
    assert parse_network("::ffff:192.0.2.7") == ipaddress.ip_network("192.0.2.7/32")
    assert parse_network("::ffff:192.0.2.0/120") == ipaddress.ip_network("192.0.2.0/24")
    assert Source.parse("::ffff:192.0.2.7").text == "192.0.2.7"


def test_bracketed_ipv6_is_accepted() -> None:
    assert Source.parse("[2001:db8::5]").text == "2001:db8::5"


@pytest.mark.parametrize("name", ["", "-x", "Office", "a" * 64, "a b", "x/y", "é"])
def test_bad_entry_names(name: str) -> None:
    with pytest.raises(ValidationError, match="bad entry name"):
        validate_name(name)


@pytest.mark.parametrize("name", ["office", "a", "dialin-alice", "knock-20261121-101010", "a.b_c-d"])
def test_good_entry_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("fqdn,why", [
    ("*.example.com", "wildcard"),
    ("localhost", "fully qualified"),
    ("-bad.example.com", "label"),
    ("bad-.example.com", "label"),
    ("a" * 64 + ".example.com", "label"),
    ("x." * 127 + "com", "253"),
    ("host.123", "numeric"),
    ("under_score.example.com", "label"),
])
def test_bad_dns_names(fqdn: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        validate_fqdn(fqdn)


def test_dns_source() -> None:
    s = Source.parse("Phone.Example.COM.")
    assert s.is_dns and s.fqdn == "phone.example.com"


def test_services_codes_and_all() -> None:
    cat = build_catalogue()
    assert resolve_services(["4"], cat) == ("http", "https")
    assert resolve_services(["1", "3", "8"], cat) == ("iax", "sip-udp", "ssh")
    assert resolve_services(["sip-udp", "0"], cat) == ("all",)
    with pytest.raises(ValidationError, match="unknown service"):
        resolve_services(["telnet"], cat)
    with pytest.raises(ValidationError, match="no service"):
        resolve_services([], cat)


def test_catalogue_ports_and_overrides() -> None:
    cat = build_catalogue({"sip-udp": {"ports": "5080"}, "myapp": {"proto": "tcp", "ports": "9000-9001"}})
    assert cat["sip-udp"].ports == ((5080, 5080),)
    assert cat["webrtc"].port_spec() == "8088-8089"
    assert cat["ucp"].port_spec() == "8001,8003"
    assert cat["myapp"].covers("tcp", 9001)
    with pytest.raises(ValidationError):
        build_catalogue({"newsvc": {"proto": "tcp"}})
    with pytest.raises(ValidationError):
        build_catalogue({"all": {"ports": "1"}})


@pytest.mark.parametrize("spec", ["0", "70000", "20-10", "x", ""])
def test_bad_ports(spec: str) -> None:
    with pytest.raises(ValidationError):
        parse_ports(spec)


def test_durations() -> None:
    assert parse_duration("1h30m") == timedelta(hours=1, minutes=30)
    assert parse_duration("90") == timedelta(seconds=90)
    assert format_duration(timedelta(days=8)) == "1w1d"
    assert parse_duration("1000d") == timedelta(days=1000)
    for bad in ("", "0s", "1x", "h", "-1h", "1h x", "1001d", "200w"):
        with pytest.raises(ValidationError):
            parse_duration(bad)
