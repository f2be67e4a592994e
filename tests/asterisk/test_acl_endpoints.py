"""One named ACL per PJSIP endpoint: `[tm4-1001]` beside `[tm4]` in acl_tm4.conf (golden
files), the include tm4 owns that ties endpoint 1001 to it with `[1001](+type=endpoint)`,
what `tm4 asterisk install` offers (never trunks, never endpoints no entry names), and a
dial-in grant moving alice's endpoint ACL in the same transaction as her whitelist entry.
Regenerate the golden files after a deliberate change with TM4_UPDATE_GOLDEN=1."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ami_acl_sim import AmiAclSim, User
from cli_support import store_only_cli
from click.testing import CliRunner
from dialin_support import Clock, add_passcode, make_core
from hypothesis import given
from hypothesis import strategies as st

from tm4.asterisk.acl import (
    ACL_FILE,
    acl_status,
    desired_rules,
    endpoint_rules,
    permits,
    render_acl,
    rules_in_conf,
    write_acl,
    write_ties,
)
from tm4.asterisk.confparse import read_conf
from tm4.asterisk.ties import (
    ENDPOINTS_FILE,
    endpoint_candidates,
    prune_ties,
    render_endpoint_ties,
    tied_endpoints,
)
from tm4.cli import cli
from tm4.core.errors import ValidationError
from tm4.core.model import Entry, Source, validate_endpoint
from tm4.dialin.ops import DIALIN_OPS
from tm4.ops.engine import Core

GOLDEN = Path(__file__).parent.parent / "golden" / "acl" / "endpoints"
REAL2 = Path(__file__).parent.parent / "fixtures" / "audit" / "real2"
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def entry(name: str, sources: list[str], services: list[str], endpoints: list[str], *,
          expires: datetime | None = None, resolved: dict[str, list[str]] | None = None) -> Entry:
    return Entry(
        name=name, sources=tuple(Source.parse(s) for s in sources), services=tuple(services),
        created=NOW - timedelta(days=1), expires=expires, endpoints=tuple(endpoints),
        resolved={k: tuple(ipaddress.ip_network(a) for a in v) for k, v in (resolved or {}).items()},
    )


ENTRIES = [
    entry("alice-home", ["alice.example.com"], ["sip-udp"], ["1001"],
          resolved={"alice.example.com": ["203.0.113.7/32", "2001:db8:7::7/128"]}),
    entry("dialin-alice", ["198.51.100.20"], ["sip-udp", "sip-tcp"], ["1001"], expires=NOW + timedelta(hours=8)),
    entry("office", ["192.0.2.0/24"], ["sip-udp"], ["1001", "1002"]),
    entry("desk", ["192.0.2.77"], ["sip-udp"], ["1002"]),  # inside the office /24: merged away
    entry("bob-old", ["198.51.100.30"], ["sip-udp"], ["1003"], expires=NOW - timedelta(minutes=1)),
    entry("carol-web", ["203.0.113.40"], ["https"], ["1004"]),  # no SIP: not in any ACL
    entry("provider", ["198.51.100.200"], ["sip-udp"], []),  # only in [tm4]
]


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("TM4_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_endpoint_acls_golden() -> None:
    golden("acl_tm4.conf", render_acl(ENTRIES, NOW, tied=["1003", "1005"]))


def test_the_tm4_acl_is_the_same_with_or_without_endpoints() -> None:
    plain = [Entry(e.name, e.sources, e.services, e.origin, e.created, e.expires, e.note, e.resolved)
             for e in ENTRIES]
    without = render_acl(plain, NOW)
    assert "[tm4-" not in without
    assert render_acl(ENTRIES, NOW).startswith(without)
    assert rules_in_conf(render_acl(ENTRIES, NOW)) == desired_rules(plain, NOW)


def test_each_endpoint_permits_only_its_owners() -> None:
    text = render_acl(ENTRIES, NOW, tied=["1003"])
    r1001, r1002, r1003 = (rules_in_conf(text, f"tm4-{ep}") for ep in ("1001", "1002", "1003"))
    for addr in ("203.0.113.7", "2001:db8:7::7", "198.51.100.20", "192.0.2.5"):
        assert permits(r1001, addr), addr
    for addr in ("198.51.100.200", "203.0.113.8", "198.51.100.30", "2001:db8::1"):
        assert not permits(r1001, addr), addr
    assert permits(r1002, "192.0.2.77") and not permits(r1002, "203.0.113.7")
    # bob's entry expired: 1003 stays tied, so its ACL exists and denies everyone
    assert r1003 == desired_rules([], NOW) and not permits(r1003, "198.51.100.30")
    assert rules_in_conf(text, "tm4-1004") == []  # https only: not rendered, not tied


def test_ties_golden_and_asterisk_reads_them_onto_the_endpoint_only(tmp_path: Path) -> None:
    text = render_endpoint_ties(["1002", "1001"])
    golden("pjsip_tm4_endpoints.conf", text)
    etc = tmp_path / "etc"
    shutil.copytree(REAL2, etc)
    (etc / ENDPOINTS_FILE).write_text(text)
    with (etc / "pjsip.conf").open("a") as f:
        f.write(f'#include "{ENDPOINTS_FILE}"\n')
    conf = read_conf(etc / "pjsip.conf")
    assert not conf.notes
    by_type = {(s.name, s.type): s for s in conf.sections if not s.is_template}
    assert by_type[("1001", "endpoint")].get("acl") == "tm4-1001"
    assert by_type[("1002", "endpoint")].get("acl") == "tm4-1002"
    # [1001] is also an auth and an aor: (+type=endpoint) leaves them alone
    assert by_type[("1001", "auth")].get("acl") is None and by_type[("1001", "aor")].get("acl") is None


def test_an_include_before_the_endpoint_is_what_asterisk_refuses(tmp_path: Path) -> None:
    (tmp_path / ENDPOINTS_FILE).write_text(render_endpoint_ties(["1001"]))
    (tmp_path / "pjsip.conf").write_text(f'#include "{ENDPOINTS_FILE}"\n[1001]\ntype = endpoint\n')
    conf = read_conf(tmp_path / "pjsip.conf")
    assert any("not defined before it" in n for n in conf.notes)


@pytest.fixture
def core(tmp_path: Path) -> Core:
    c = make_core(tmp_path)
    etc = tmp_path / "etc"
    shutil.copytree(REAL2, etc)
    c.config.asterisk.config_dir = str(etc)
    return c


def test_install_offers_phones_an_entry_names_never_trunks(core: Core) -> None:
    core.allow("alice", ["203.0.113.7"], ["sip-udp"], endpoints=["1001"])
    core.allow("prov", ["198.51.100.200"], ["sip-udp"], endpoints=["prov-a"])
    core.allow("anon", ["192.0.2.9"], ["sip-udp"], endpoints=["anonymous", "9999"])
    add_passcode(core, "bob", "48213977", endpoints=["1002"])
    got = {c.endpoint: (c.offered, c.reason) for c in endpoint_candidates(core)}
    assert got["1001"] == (True, "") and got["1002"] == (True, "")  # bob's passcode will serve 1002
    assert got["prov-a"][0] is False and "trunk" in got["prov-a"][1]
    assert got["anonymous"][0] is False and "anonymous" in got["anonymous"][1]
    assert got["9999"][0] is False
    assert "prov-b" not in got  # no entry names it: not offered at all
    with pytest.raises(ValidationError):
        write_ties(core, ["prov-a"])
    assert not (Path(core.config.asterisk.config_dir) / ENDPOINTS_FILE).exists()


def test_write_ties_includes_at_the_end_once_with_a_backup(core: Core) -> None:
    etc = Path(core.config.asterisk.config_dir)
    (etc / ACL_FILE).write_text("")
    core.allow("alice", ["203.0.113.7"], ["sip-udp"], endpoints=["1001"])
    before = (etc / "pjsip.conf").read_text()
    ties = write_ties(core, ["1001"])
    assert ties.changed and ties.include is not None and ties.include.changed and ties.include.backup
    after = (etc / "pjsip.conf").read_text()
    assert after.startswith(before) and after.rstrip().endswith(f'#include "{ENDPOINTS_FILE}"')
    assert tied_endpoints(core.config) == ["1001"]
    assert "[tm4-1001]" in (etc / ACL_FILE).read_text()  # the ACL exists before pjsip refers to it
    again = write_ties(core, ["1001"])
    assert not again.changed and again.include is not None and not again.include.changed
    assert (etc / "pjsip.conf").read_text() == after


def test_an_endpoint_gone_from_pjsip_is_untied(core: Core) -> None:
    etc = Path(core.config.asterisk.config_dir)
    core.allow("alice", ["203.0.113.7"], ["sip-udp"], endpoints=["1001", "1002"])
    write_ties(core, ["1001", "1002"])
    text = (etc / "pjsip.conf").read_text()
    start = text.index("[1002](phone-endpoint)")
    (etc / "pjsip.conf").write_text(text[:start] + text[text.index("[1002]\ntype = auth"):])
    assert prune_ties(core) == ["1002"]
    assert tied_endpoints(core.config) == ["1001"]
    assert not read_conf(etc / "pjsip.conf").notes


def test_cli_install_ties_the_named_endpoint(core: Core, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    async def fake_install(c: Core, toml: Path, *, endpoint_acls: Any = None, **kw: Any) -> Any:
        seen.append(endpoint_acls([type("C", (), {"endpoint": "1001"})()]))
        raise SystemExit(0)

    monkeypatch.setattr("tm4.cli.asterisk.install_async", fake_install)
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n')
    res = CliRunner().invoke(cli, ["--config", str(cfg), "asterisk", "install", "--endpoint-acl", "1002"])
    assert res.exit_code == 0, res.output
    assert seen == [["1002"]]
    res = CliRunner().invoke(cli, ["--config", str(cfg), "asterisk", "install", "--all-endpoint-acls"])
    assert res.exit_code == 0, res.output
    assert seen[-1] == ["1001"]


# -- a dial-in grant moves the endpoint's ACL -----------------------------------------------

def op(core: Core, name: str, **args: Any) -> dict[str, Any]:
    return DIALIN_OPS[f"dialin.{name}"](core, args)


def grant(core: Core, address: str) -> dict[str, Any]:
    tok = op(core, "verify", passcode="48213977", callerid="5551234")["token"]
    return op(core, "grant", token=tok, address=address, callerid="5551234")


def test_dialin_grant_moves_alices_endpoint_acl_in_the_same_step(core: Core) -> None:
    etc = Path(core.config.asterisk.config_dir)
    (etc / ACL_FILE).write_text("")
    add_passcode(core, "alice", "48213977", endpoints=["1001"])
    r = grant(core, "203.0.113.7")
    assert r["entry"]["endpoints"] == ["1001"]
    write_acl(core)
    r1001 = rules_in_conf((etc / ACL_FILE).read_text(), "tm4-1001")
    assert permits(r1001, "203.0.113.7") and not permits(r1001, "198.51.100.9")

    n_audit = len(core.store.audit_log(1000))
    r = grant(core, "198.51.100.9")
    assert r["replaced"] == ["203.0.113.7"]
    # one store transaction replaced the entry: one audit record, the old address gone
    recs = core.store.audit_log(1000)[n_audit:]
    assert [x.action for x in recs if x.subject == "dialin-alice"] == ["dialin-verify", "replace"]
    assert write_acl(core) is True
    text = (etc / ACL_FILE).read_text()
    r1001 = rules_in_conf(text, "tm4-1001")
    assert permits(r1001, "198.51.100.9") and not permits(r1001, "203.0.113.7")
    # [tm4] moved with it, and so did the kernel
    assert permits(rules_in_conf(text), "198.51.100.9") and not permits(rules_in_conf(text), "203.0.113.7")
    kernel = core.backend.addresses()  # type: ignore[attr-defined]
    assert "198.51.100.9" in kernel and "203.0.113.7" not in kernel


def test_an_expired_grant_closes_the_endpoint(tmp_path: Path) -> None:
    clock = Clock()
    c = make_core(tmp_path, {"grant_ttl": "1h"}, clock=clock)
    add_passcode(c, "alice", "48213977", endpoints=["1001"])
    grant(c, "203.0.113.7")
    assert permits(endpoint_rules(c.entries(), clock())["1001"], "203.0.113.7")
    clock.advance(hours=2)
    assert "1001" not in endpoint_rules(c.entries(), clock())
    assert not permits(endpoint_rules(c.entries(), clock(), tied=["1001"])["1001"], "203.0.113.7")


def test_endpoints_show_in_list_and_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    invoke = store_only_cli(tmp_path, monkeypatch)
    res = invoke("add", "alice", "203.0.113.7", "-s", "sip-udp", "--endpoint", "1001", "--endpoint", "1002")
    assert res.exit_code == 0, res.output

    listed = json.loads(invoke("list", "--json").output)
    assert listed[0]["endpoints"] == ["1001", "1002"]
    shown = json.loads(invoke("show", "alice", "--json").output)
    assert shown["endpoints"] == ["1001", "1002"]
    bad = invoke("add", "eve", "203.0.113.9", "-s", "sip-udp", "--endpoint", "10 01]")
    assert bad.exit_code != 0
    res = invoke("passcode", "add", "bob", "--endpoint", "1003", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["endpoints"] == ["1003"]


@given(st.text(max_size=90))
def test_endpoint_names_that_pass_are_safe_in_a_section_header(name: str) -> None:
    try:
        validate_endpoint(name)
    except ValidationError:
        return
    assert not set(name) & set("[]();=,#\n\r\t \\\"'")
    text = render_endpoint_ties([name])
    assert f"[{name}](+type=endpoint)\nacl = tm4-{name}\n" in text


def test_status_compares_each_endpoint_acl_with_what_asterisk_loaded(core: Core) -> None:
    etc = Path(core.config.asterisk.config_dir)
    (etc / ACL_FILE).write_text("")
    core.allow("alice", ["203.0.113.7"], ["sip-udp"], endpoints=["1001"])
    write_ties(core, ["1001"])
    sim = AmiAclSim(config_dir=etc, users={"watcher": User("w4tcherSecret", write={"system", "command"})}).start()
    try:
        core.config.ami.port, core.config.ami.username, core.config.ami.secret = sim.port, "watcher", "w4tcherSecret"
        st = asyncio.run(acl_status(core, timeout=3))
        assert [(e["endpoint"], e["tied"], e["asterisk_current"]) for e in st.endpoints] == [("1001", True, True)]
        assert st.endpoints[0]["rendered_rules"][-1] == "permit 203.0.113.7/255.255.255.255"
        core.allow("alice", ["198.51.100.9"], ["sip-udp"], endpoints=["1001"], replace=True)
        write_acl(core)  # the file moved; Asterisk has not reloaded yet
        st = asyncio.run(acl_status(core, timeout=3))
        assert st.endpoints[0]["asterisk_current"] is False and not st.ok
        assert st.endpoints[0]["asterisk_rules"][-1] == "permit 203.0.113.7/255.255.255.255"
        sim.reload_acl()
        st = asyncio.run(acl_status(core, timeout=3))
        assert st.endpoints[0]["asterisk_current"] is True
    finally:
        sim.stop()


def test_a_dns_refresh_keeps_the_endpoints_and_moves_the_endpoint_acl(core: Core) -> None:
    core.allow("alice-home", ["alice.example.com"], ["sip-udp"], endpoints=["1001"])
    core.set_resolved("alice-home", {"alice.example.com": (ipaddress.ip_network("203.0.113.7/32"),)}, None)
    assert core.get_entry("alice-home").endpoints == ("1001",)
    assert permits(endpoint_rules(core.entries(), core.clock())["1001"], "203.0.113.7")
    core.set_resolved("alice-home", {"alice.example.com": (ipaddress.ip_network("203.0.113.8/32"),)}, None)
    rules = endpoint_rules(core.entries(), core.clock())["1001"]
    assert permits(rules, "203.0.113.8") and not permits(rules, "203.0.113.7")
