"""tm4 audit: one sample Asterisk directory per finding (tests/fixtures/audit/<case>),
golden JSON for each (tests/golden/audit/<case>.json), every check id proven, a clean
directory that yields nothing, no secret ever printed, no file read outside the
directory given. Regenerate goldens after a deliberate change with TM4_UPDATE_GOLDEN=1."""

from __future__ import annotations

import json
import os
import pathlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tm4.asterisk.audit import (
    CHECK_IDS,
    EntryInfo,
    PasscodeInfo,
    Tm4State,
    at_least,
    audit,
    load_asterisk,
)
from tm4.asterisk.audit.pbx import read_pbx
from tm4.cli import cli
from tm4.core.model import Entry, Source
from tm4.core.store import Store
from tm4.dialin import store as dialin_store

FIXTURES = Path(__file__).parent.parent / "fixtures" / "audit"
GOLDEN = Path(__file__).parent.parent / "golden" / "audit"
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)

SIP_PUBLIC: dict[str, Any] = {"public_services": ("sip-udp",)}
RISKY_TM4: dict[str, Any] = {
    "public_services": ("sip-udp", "ssh", "http"),
    "safe_mode": False,
    "entries": (
        EntryInfo("anywhere", ("ssh",), ("0.0.0.0/0",), False, False),
        EntryInfo("office", ("sip-udp", "ssh"), ("192.0.2.10/32",), False, False),
        EntryInfo("home", ("sip-udp",), ("203.0.113.5/32",), True, False),
        EntryInfo("old-ssh", ("ssh",), ("::/0",), False, True),  # expired: not a risk
    ),
    "passcodes": (
        PasscodeInfo("alice", NOW - timedelta(days=200), NOW - timedelta(days=91)),
        PasscodeInfo("bob", NOW - timedelta(days=120), None),
        PasscodeInfo("carol", NOW - timedelta(days=400), NOW - timedelta(days=3)),
    ),
}

# case directory -> (tm4 state, the check ids it must report)
CASES: dict[str, tuple[dict[str, Any], set[str]]] = {
    "clean": (SIP_PUBLIC, set()),
    "endpoint-acl-by-tm4": (SIP_PUBLIC, set()),
    "secret-common": (SIP_PUBLIC, {"secret-common"}),
    "secret-matches-name": (SIP_PUBLIC, {"secret-matches-name"}),
    "secret-digits": (SIP_PUBLIC, {"secret-digits"}),
    "secret-short": (SIP_PUBLIC, {"secret-short"}),
    "secret-empty": (SIP_PUBLIC, {"secret-empty"}),
    "ami-weak-secret": (SIP_PUBLIC, {"secret-short"}),
    "endpoint-no-acl": (SIP_PUBLIC, {"endpoint-no-acl"}),
    "acl-undefined": (SIP_PUBLIC, {"acl-undefined"}),
    "anonymous-reaches-trunk": (SIP_PUBLIC, {"anonymous-reaches-trunk"}),
    "sip-allowguest": (SIP_PUBLIC, {"sip-allowguest"}),
    "sip-alwaysauthreject-off": (SIP_PUBLIC, {"sip-alwaysauthreject-off"}),
    "dialplan-wildcard-to-trunk": (SIP_PUBLIC, {"dialplan-wildcard-to-trunk"}),
    "dialplan-international": (SIP_PUBLIC, {"dialplan-international"}),
    "trunk-no-call-limit": (SIP_PUBLIC, {"trunk-no-call-limit"}),
    "trunk-no-call-limit-sip": (SIP_PUBLIC, {"trunk-no-call-limit"}),
    "ami-bind-public": (SIP_PUBLIC, {"ami-bind-public"}),
    "ami-permit-any": (SIP_PUBLIC, {"ami-permit-any"}),
    "ami-broad-write": (SIP_PUBLIC, {"ami-broad-write"}),
    "rtp-range-mismatch": (SIP_PUBLIC, {"rtp-range-mismatch"}),
    "include-outside": (SIP_PUBLIC, {"include-outside"}),
    "conf-adds-to-nothing": (SIP_PUBLIC, {"conf-adds-to-nothing", "endpoint-no-acl"}),
    "tm4-state": (RISKY_TM4, {"tm4-ssh-world", "tm4-public-service", "tm4-safe-mode-off",
                              "tm4-passcode-unused", "tm4-dns-stale"}),
    # the real Asterisk 22 configuration of the real2 captures, as it was
    "real2": (SIP_PUBLIC, {"secret-matches-name", "secret-short", "endpoint-no-acl", "ami-broad-write",
                           "rtp-range-mismatch"}),
}


def state(**kw: Any) -> Tm4State:
    return Tm4State(now=NOW, **kw)


def run(case: str, **kw: Any) -> list[dict[str, Any]]:
    return [f.to_json() for f in audit(load_asterisk(FIXTURES / case), state(**kw))]


@pytest.mark.parametrize("case", sorted(CASES))
def test_case_reports_exactly_its_findings(case: str) -> None:
    kw, want = CASES[case]
    got = run(case, **kw)
    assert {f["id"] for f in got} == want
    golden = GOLDEN / f"{case}.json"
    text = json.dumps(got, indent=2) + "\n"
    if os.environ.get("TM4_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


def test_every_check_id_is_proven_by_a_case() -> None:
    proven = set().union(*(ids for _, ids in CASES.values()))
    assert proven == set(CHECK_IDS)


def test_findings_have_the_contract_shape() -> None:
    for case, (kw, _) in CASES.items():
        for f in run(case, **kw):
            assert list(f) == ["id", "severity", "file", "line", "title", "detail", "fix"], case
            assert f["severity"] in ("info", "low", "medium", "high")
            assert f["id"] in CHECK_IDS
            assert f["line"] is None or (isinstance(f["line"], int) and f["line"] > 0)


def test_endpoint_acl_only_matters_when_sip_is_reachable_from_outside() -> None:
    assert run("endpoint-no-acl") == []  # SIP only from the whitelist: the firewall guards it
    knock = run("endpoint-no-acl", knock_enabled=True, knock_services=("sip-udp",))
    assert [(f["id"], f["severity"]) for f in knock] == [("endpoint-no-acl", "medium")]
    domain = run("endpoint-no-acl", secret_domain=True)
    assert [(f["id"], f["severity"]) for f in domain] == [("endpoint-no-acl", "medium")]
    assert "secret SIP domain" in domain[0]["detail"]
    public = run("endpoint-no-acl", public_services=("all",))
    assert [(f["id"], f["severity"]) for f in public] == [("endpoint-no-acl", "high"),
                                                          ("tm4-public-service", "high")]


def test_tm4_appended_endpoint_acl_is_seen_through_the_include() -> None:
    pbx = read_pbx(load_asterisk(FIXTURES / "endpoint-acl-by-tm4"))
    e = pbx.find("PJSIP", "1001")
    assert e is not None and e.acls == ["tm4-1001"] and e.kind == "phone"
    assert "tm4-1001" in pbx.named_acls


def _secrets() -> set[str]:
    out: set[str] = set()
    for case in CASES:
        for s in read_pbx(load_asterisk(FIXTURES / case)).secrets:
            if len(s.value) >= 4:
                out.add(s.value)
    return out


def test_no_secret_is_ever_printed(tmp_path: Path) -> None:
    secrets = _secrets()
    assert {"Trustno1", "4829175038264", "k7Qp2x", "r3p0rtZ", "secret1001", "observersecret"} <= secrets
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n[firewall]\npublic_services = ["sip-udp"]\n')
    for case in CASES:
        for extra in ([], ["--json"]):
            res = CliRunner().invoke(cli, ["--config", str(cfg), "audit", "--asterisk-dir",
                                           str(FIXTURES / case), *extra])
            assert res.exit_code in (0, 1), res.output
            low = res.output.lower()
            leaked = [s for s in secrets if s.lower() in low]
            assert not leaked, (case, leaked)


def test_never_reads_outside_the_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    base = FIXTURES / "include-outside"
    read: list[Path] = []
    real = pathlib.Path.read_bytes

    def spy(self: Path) -> bytes:
        read.append(self.resolve())
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", spy)
    files = load_asterisk(base)
    findings = audit(files, state(**SIP_PUBLIC))
    assert read and all(p.is_relative_to(base.resolve()) for p in read), read
    outside = [f for f in findings if f.id == "include-outside"]
    assert [f.line for f in outside] == [51, 52]
    # the outside file's weak [9999] auth was never parsed
    assert not any("9999" in f.title for f in findings)
    assert read_pbx(files).find("PJSIP", "9999") is None


def test_a_symlink_leading_outside_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "asterisk"
    d.mkdir()
    (tmp_path / "secret.conf").write_text("[1]\ntype=auth\npassword=1\n")
    (d / "pjsip.conf").symlink_to(tmp_path / "secret.conf")
    files = load_asterisk(d)
    assert files.get("pjsip.conf") is None
    assert [f.id for f in audit(files, state())] == ["include-outside"]


def _cli(tmp_path: Path, toml: str = "") -> tuple[Path, Any]:
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n' + toml)

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(cli, ["--config", str(cfg), "audit", *args])
    return cfg, invoke


def test_exit_code_follows_min_severity(tmp_path: Path) -> None:
    _, invoke = _cli(tmp_path, '[firewall]\npublic_services = ["sip-udp"]\n')
    clean = invoke("--asterisk-dir", str(FIXTURES / "clean"))
    assert clean.exit_code == 0 and "no findings" in clean.output
    assert invoke("--asterisk-dir", str(FIXTURES / "clean"), "--json").output.strip() == "[]"
    medium = str(FIXTURES / "secret-short")
    assert invoke("--asterisk-dir", medium).exit_code == 1
    assert invoke("--asterisk-dir", medium, "--min-severity", "high").exit_code == 0
    low = str(FIXTURES / "ami-permit-any")  # loopback-only AMI: low
    assert invoke("--asterisk-dir", low).exit_code == 0
    assert invoke("--asterisk-dir", low, "--min-severity", "low").exit_code == 1
    assert invoke("--asterisk-dir", low, "--min-severity", "info").exit_code == 1
    bad = invoke("--asterisk-dir", low, "--min-severity", "severe")
    assert bad.exit_code == 2


def test_cli_reads_tm4_state_from_the_store(tmp_path: Path) -> None:
    _, invoke = _cli(tmp_path, "[daemon]\nsafe_mode = false\n")
    store = Store(tmp_path / "state" / "tm4.db")
    now = datetime.now(UTC).replace(microsecond=0)
    store.put_entry(Entry("world", (Source.parse("0.0.0.0/0", force=True),), ("ssh",), created=now))
    store.put_entry(Entry("ddns", (Source.parse("home.example.com"),), ("sip-udp",), created=now,
                          stale_since=now - timedelta(days=9)))
    dialin_store.put_passcode(store, {"owner": "alice", "lookup": "x", "hash": "scrypt$1$1$1$a$b",
                                      "services": "[]", "ttl": None, "keep": 1,
                                      "created": (now - timedelta(days=100)).isoformat(), "last_used": None})
    store.close()
    res = invoke("--asterisk-dir", str(FIXTURES / "clean"), "--json")
    assert res.exit_code == 1, res.output
    ids = sorted(f["id"] for f in json.loads(res.output))
    assert ids == ["tm4-dns-stale", "tm4-passcode-unused", "tm4-safe-mode-off", "tm4-ssh-world"]


def test_missing_store_is_not_created(tmp_path: Path) -> None:
    _, invoke = _cli(tmp_path)
    assert invoke("--asterisk-dir", str(FIXTURES / "clean")).exit_code == 0
    assert not (tmp_path / "state").exists()


def test_at_least() -> None:
    found = audit(load_asterisk(FIXTURES / "tm4-state"), state(**RISKY_TM4))
    sev = {f.severity for f in found}
    assert {"high", "medium", "low"} <= sev
    assert all(f.severity == "high" for f in at_least(found, "high"))
    assert len(at_least(found, "info")) == len(found)


_line = st.one_of(
    st.sampled_from(["[1001]", "[1001](+type=endpoint)", "[t](!)", "[x](t)", "type = endpoint", "type = auth",
                     "password = 1234", "auth = 1001", "context = internal", "include => internal",
                     "exten => _X.,1,Dial(PJSIP/${EXTEN}@prov)", "same => n,Goto(a,b,1)",
                     "exten => s,1,GotoIf($[1]?x,s,1:y,s,1)", "#include \"../x.conf\"", "#include x*.conf",
                     "[general]", "enabled = yes", "bindaddr = ::", "permit = 0.0.0.0/0", "write = all",
                     "secret = ", "host = 198.51.100.1", "outbound_auth = a", "rtpstart = x"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(st.sampled_from(["pjsip.conf", "sip.conf", "iax.conf", "manager.conf",
                                               "extensions.conf", "rtp.conf", "acl.conf",
                                               "pjsip_wizard.conf"]),
                             st.lists(_line, max_size=25), max_size=5))
def test_hostile_config_never_crashes(tmp_path_factory: pytest.TempPathFactory, files: dict[str, list[str]]) -> None:
    d = tmp_path_factory.mktemp("hostile")
    for name, lines in files.items():
        (d / name).write_text("\n".join(lines), encoding="utf-8")
    found = audit(load_asterisk(d), state(public_services=("sip-udp",), rtp=(10000, 20000)))
    json.dumps([f.to_json() for f in found])
    for f in found:
        assert f.id in CHECK_IDS
