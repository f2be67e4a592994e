"""One rule for every ban and entry: an address the kernel can never see as a source is
refused before it is stored, however the ban or entry is made."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path

import pytest
from fakes import MemoryKernel
from hypothesis import given, settings
from hypothesis import strategies as st

from tm4.core.config import parse_config
from tm4.core.errors import NeverSourceError, ValidationError
from tm4.core.model import (
    NEVER_SOURCE,
    Ban,
    Entry,
    Source,
    check_source,
    never_source_reason,
    parse_network,
    validate_network,
)
from tm4.core.store import Store
from tm4.ops.engine import Core
from tm4.ops.root import run_local

NEVER = ["224.0.0.1", "239.255.255.250", "255.255.255.255", "ff02::1", "ff02::/64", "ff05::1:3",
         "0.0.0.0", "0.1.2.3", "::", "::ffff:224.0.0.251", "224.0.0.0/24", "ff00::/8"]


def make_core(tmp_path: Path) -> Core:
    return Core(parse_config({"state_dir": str(tmp_path / "state")}), backend=MemoryKernel(),  # type: ignore[arg-type]
                protect=[])


@pytest.mark.parametrize("text", NEVER)
def test_never_a_source_is_refused_naming_the_address_and_why(text: str) -> None:
    with pytest.raises(NeverSourceError) as exc:
        parse_network(text, force=True)
    msg = str(exc.value)
    assert msg.startswith(text) and "never be the source" in msg
    assert any(w in msg for w in ("multicast", "broadcast", "unspecified", "this network"))


@pytest.mark.parametrize("text", ["127.0.0.1", "240.0.0.1", "169.254.1.1", "fe80::1", "192.0.2.7",
                                  "2001:db8::/48", "0.0.0.0/0", "::/0", "224.0.0.0/3"])
def test_real_sources_and_wide_forced_networks_pass_the_rule(text: str) -> None:
    assert never_source_reason(parse_network(text, force=True)) is None


def _networks() -> st.SearchStrategy[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    v4 = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
        lambda t: ipaddress.IPv4Network((t[0] >> (32 - t[1]) << (32 - t[1]), t[1])))
    v6 = st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
        lambda t: ipaddress.IPv6Network((t[0] >> (128 - t[1]) << (128 - t[1]), t[1])))
    return st.one_of(v4, v6)


@settings(max_examples=400, deadline=None)
@given(_networks(), st.booleans())
def test_whatever_parses_is_a_possible_source_and_text_and_object_agree(net, force: bool) -> None:  # type: ignore[no-untyped-def]
    try:
        from_text = parse_network(str(net), force=force)
    except ValidationError:
        from_text = None
    try:
        from_object = validate_network(net, force=force)
    except ValidationError:
        from_object = None
    assert from_text == from_object  # Core.block(network object) is checked exactly as text is
    if from_text is not None:
        assert never_source_reason(from_text) is None
    inside = any(net.version == r.version and net.subnet_of(r) for r, _ in NEVER_SOURCE)  # type: ignore[arg-type]
    if inside:
        assert from_text is None


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([r for r, _ in NEVER_SOURCE]), st.integers(0, 2**128 - 1))
def test_every_address_of_a_never_source_range_is_refused(rng, n: int) -> None:  # type: ignore[no-untyped-def]
    addr = rng[n % rng.num_addresses]
    with pytest.raises(NeverSourceError):
        check_source(ipaddress.ip_network(addr))


@pytest.mark.parametrize("net", [ipaddress.ip_network("224.0.0.1/32"), ipaddress.ip_network("ff02::/64"),
                                 ipaddress.ip_network("255.255.255.255/32"),
                                 ipaddress.ip_network("::ffff:239.255.255.250/128")])
def test_core_block_checks_network_objects_as_the_guard_hands_them(tmp_path: Path, net) -> None:  # type: ignore[no-untyped-def]
    core = make_core(tmp_path)
    with pytest.raises(NeverSourceError):
        core.block(net, ttl=timedelta(hours=1), reason="flood")  # type: ignore[arg-type]
    assert core.bans() == [] and core.backend.addresses() == set()  # type: ignore[attr-defined]
    assert core.store.quarantined() == []


def test_core_block_checks_prefix_length_of_network_objects_too(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    with pytest.raises(ValidationError, match="shorter than /8"):
        core.block(ipaddress.ip_network("10.0.0.0/7"))  # type: ignore[arg-type]
    assert core.block(ipaddress.ip_network("::ffff:192.0.2.9/128")).address == "192.0.2.9"  # type: ignore[arg-type]


@pytest.mark.parametrize("op,args", [
    ("block", {"address": "239.255.255.250"}),
    ("block", {"address": "ff02::1", "force": True}),
    ("allow", {"name": "mc", "sources": ["224.0.0.251"], "services": ["sip-udp"]}),
    ("allow", {"name": "bc", "sources": ["192.0.2.7", "255.255.255.255"], "services": ["ssh"]}),
])
def test_every_operation_refuses_before_storing(tmp_path: Path, op: str, args: dict[str, object]) -> None:
    core = make_core(tmp_path)
    with pytest.raises(NeverSourceError):
        run_local(core, op, args)
    assert core.bans() == [] and core.entries() == []
    assert core.store.audit_log() == [] and core.backend.addresses() == set()  # type: ignore[attr-defined]


def test_the_store_itself_refuses_what_no_reader_could_read_back(tmp_path: Path) -> None:
    """The last line for paths that build model objects themselves (import, DNS, peers)."""
    store = Store(tmp_path / "tm4.db")
    with pytest.raises(NeverSourceError):
        store.put_ban(Ban(network=ipaddress.ip_network("224.0.0.1/32")))
    e = Entry("dns", (Source.parse("pbx.example.com"),), ("sip-udp",),
              resolved={"pbx.example.com": (ipaddress.ip_network("ff02::1/128"),)})
    with pytest.raises(NeverSourceError):
        store.put_entry(e)
    assert store.bans() == [] and store.entries() == []
