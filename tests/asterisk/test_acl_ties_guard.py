"""tm4's pjsip include never adds to an endpoint pjsip.conf does not define before it:
Asterisk ignores, with a WARNING, a `[1001](+type=endpoint)` that adds to nothing, so
that endpoint would silently run without its ACL (tests/asterisk/test_real_asterisk_adds.py
shows it on a real Asterisk). The sync unties endpoints that are gone or were moved after the include; install
does not offer them; `tm4 asterisk status` and `tm4 audit` warn while the file is wrong."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from dialin_support import make_core
from hypothesis import given, settings
from hypothesis import strategies as st

from tm4.asterisk.acl import (
    ACL_FILE,
    acl_status,
    sync_acl_async,
    write_ties,
)
from tm4.asterisk.audit import audit, load_asterisk
from tm4.asterisk.audit.inputs import Tm4State
from tm4.asterisk.confparse import read_conf
from tm4.asterisk.ties import (
    ENDPOINTS_FILE,
    dangling_ties,
    endpoint_candidates,
    render_endpoint_ties,
    tied_endpoints,
    ties_that_hold,
)
from tm4.cli import cli
from tm4.core.config import parse_config
from tm4.core.errors import ValidationError
from tm4.ops.engine import Core

REAL2 = Path(__file__).parent.parent / "fixtures" / "audit" / "real2"
PHONE_1005 = "\n[1005](phone-endpoint)\nauth = 1005\naors = 1005\n\n[1005](phone-aor)\n"


@pytest.fixture
def core(tmp_path: Path) -> Core:
    c = make_core(tmp_path)
    etc = tmp_path / "etc"
    shutil.copytree(REAL2, etc)
    c.config.asterisk.config_dir = str(etc)
    c.allow("alice", ["203.0.113.7"], ["sip-udp"], endpoints=["1001", "1002", "1005"])
    return c


def etc(core: Core) -> Path:
    return Path(core.config.asterisk.config_dir)


def dangling_in_asterisks_reading(core: Core) -> list[str]:
    """What Asterisk would refuse: (+) sections of tm4's include that found nothing."""
    notes = read_conf(etc(core) / "pjsip.conf").notes
    return [n for n in notes if n.startswith(ENDPOINTS_FILE) and "adds to a section" in n]


def test_a_phone_appended_after_the_include_is_not_offered_or_tied(core: Core) -> None:
    write_ties(core, ["1001"])
    pjsip = etc(core) / "pjsip.conf"
    pjsip.write_text(pjsip.read_text() + PHONE_1005)  # the admin appends a phone at the end
    got = {c.endpoint: c for c in endpoint_candidates(core)}
    assert got["1001"].offered and got["1002"].offered
    assert not got["1005"].offered and "defined after tm4's #include" in got["1005"].reason
    with pytest.raises(ValidationError, match="1005"):
        write_ties(core, ["1001", "1005"])
    assert tied_endpoints(core.config) == ["1001"] and not dangling_in_asterisks_reading(core)
    # Before the include exists, a phone anywhere in pjsip.conf holds (the include goes last).
    core2_etc = etc(core).parent / "etc2"
    shutil.copytree(REAL2, core2_etc)
    (core2_etc / "pjsip.conf").write_text((core2_etc / "pjsip.conf").read_text() + PHONE_1005)
    core.config.asterisk.config_dir = str(core2_etc)
    assert ties_that_hold(core.config, ["1001", "1005", "prov-a-auth", "nope"]) == {"1001", "1005"}
    write_ties(core, ["1005"])
    assert tied_endpoints(core.config) == ["1005"] and not dangling_in_asterisks_reading(core)


def test_the_sync_unties_an_endpoint_deleted_or_moved_after_the_include(core: Core) -> None:
    (etc(core) / ACL_FILE).write_text("")
    write_ties(core, ["1001", "1002"])
    pjsip = etc(core) / "pjsip.conf"
    text = pjsip.read_text()
    assert not dangling_ties(core.config)
    # 1002 moves below tm4's include (the admin cut and pasted it to the end)
    block = text[text.index("[1002](phone-endpoint)"):text.index("[anonymous]")]
    pjsip.write_text(text.replace(block, "") + "\n" + block)
    assert dangling_ties(core.config) == ["1002"] and dangling_in_asterisks_reading(core)
    st = asyncio.run(acl_status(core, timeout=0.2))
    assert st.dangling == ["1002"] and not st.ok and "1002" in st.dangling_warning
    res = asyncio.run(sync_acl_async(core, timeout=0.2))
    assert res.installed and res.untied == ["1002"] and res.to_json()["untied"] == ["1002"]
    assert tied_endpoints(core.config) == ["1001"] and not dangling_in_asterisks_reading(core)
    # 1001 is no endpoint any more (renamed); acl_tm4.conf gone too: the sync still unties it
    pjsip.write_text(pjsip.read_text().replace("[1001](phone-endpoint)", "[1001x](phone-endpoint)"))
    (etc(core) / ACL_FILE).unlink()
    assert dangling_ties(core.config) == ["1001"]
    asyncio.run(sync_acl_async(core, timeout=0.2))
    assert tied_endpoints(core.config) == [] and not dangling_in_asterisks_reading(core)
    assert (etc(core) / ENDPOINTS_FILE).exists()  # the include still finds its file (now empty of ties)


def test_a_missing_pjsip_conf_unties_everything(core: Core) -> None:
    (etc(core) / ACL_FILE).write_text("")
    write_ties(core, ["1001"])
    (etc(core) / "pjsip.conf").unlink()
    asyncio.run(sync_acl_async(core, timeout=0.2))
    assert tied_endpoints(core.config) == []


def test_status_and_audit_warn_while_the_include_adds_to_nothing(core: Core, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (etc(core) / ACL_FILE).write_text("")
    write_ties(core, ["1001", "1002"])
    pjsip = etc(core) / "pjsip.conf"
    pjsip.write_text(pjsip.read_text().replace("[1002](phone-endpoint)", "[1002x](phone-endpoint)"))
    findings = audit(load_asterisk(etc(core)), Tm4State(now=core.clock()))
    bad = [f for f in findings if f.id == "conf-adds-to-nothing"]
    assert [(f.file, f.severity) for f in bad] == [(ENDPOINTS_FILE, "medium")]
    assert "[1002](+type=endpoint)" in bad[0].title and "tm4 asterisk sync" in bad[0].fix

    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n[firewall]\nnetns = "tm4-test-none"\n'
                   f'[asterisk]\nconfig_dir = "{etc(core)}"\n[ami]\nport = 1\nconnect_timeout = "1s"\n')
    monkeypatch.setenv("TM4_NFT_SUBPROCESS", "1")  # the namespace does not exist: store only

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--config", str(cfg), *args])

    res = invoke("asterisk", "status", "--json")
    shown = json.loads(res.output)
    assert res.exit_code == 1 and shown["dangling_ties"] == ["1002"] and shown["ok"] is False
    assert "runs without its ACL" in shown["dangling_warning"]
    res = invoke("asterisk", "status")
    assert "WARNING:" in res.output and "1002" in res.output
    res = invoke("asterisk", "sync")
    assert res.output.startswith("untied endpoint(s) 1002: pjsip.conf no longer defines them"), res.output
    assert tied_endpoints(core.config) == ["1001"]
    res = invoke("asterisk", "status", "--json")
    assert json.loads(res.output)["dangling_ties"] == []
    assert "conf-adds-to-nothing" not in {f.id for f in audit(load_asterisk(etc(core)), Tm4State(now=core.clock()))}


PLACES = st.sampled_from(["before", "after", "absent", "auth-only"])


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.from_regex(r"[1-9][0-9]{2,4}", fullmatch=True), PLACES, min_size=1, max_size=6))
def test_a_tie_holds_exactly_when_its_endpoint_is_defined_before_the_include(layout: dict[str, str]) -> None:
    """Any arrangement of phones around tm4's include: only those defined before it hold,
    and what is written from them reads back with no (+) adding to nothing."""
    def phone(ep: str) -> str:
        return f"[{ep}]\ntype = endpoint\nauth = {ep}\n\n[{ep}]\ntype = auth\nusername = {ep}\n"

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        before = "".join(phone(ep) if where == "before" else f"[{ep}]\ntype = auth\nusername = {ep}\n"
                         if where == "auth-only" else "" for ep, where in layout.items())
        after = "".join(phone(ep) for ep, where in layout.items() if where == "after")
        (d / "pjsip.conf").write_text(f'{before}\n#include "{ENDPOINTS_FILE}"\n{after}')
        cfg = parse_config({"asterisk": {"config_dir": tmp}})
        want = {ep for ep, where in layout.items() if where == "before"}
        assert ties_that_hold(cfg, layout) == want
        (d / ENDPOINTS_FILE).write_text(render_endpoint_ties(sorted(want)))
        assert not [n for n in read_conf(d / "pjsip.conf").notes if "adds to a section" in n]
        assert dangling_ties(cfg) == []
        (d / ENDPOINTS_FILE).write_text(render_endpoint_ties(sorted(layout)))
        assert dangling_ties(cfg) == sorted(set(layout) - want)
