"""tm4d's smaller parts: alerts, other firewalls, drift reports, units, the config skeleton."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import IN_CI

from tm4.core import notify
from tm4.core.config import _SECTIONS, parse_config
from tm4.daemon.initsetup import config_skeleton, merge_values, toml_value
from tm4.daemon.units import render_units
from tm4.firewall import coexist
from tm4.ops.drift import DriftReport

ROOT = Path(__file__).resolve().parent.parent.parent


# -- notify ------------------------------------------------------------------------------

def test_journal_entry_is_native_protocol_with_the_stable_tag() -> None:
    raw = notify.journal_fields("drift_repaired", "line one\nline two", {"found": "missing", "n": 3})
    fields_: dict[str, str] = {}
    i = 0
    while i < len(raw):
        nl = raw.index(b"\n", i)
        key = raw[i:nl].decode()
        size = int.from_bytes(raw[nl + 1:nl + 9], "little")
        fields_[key] = raw[nl + 9:nl + 9 + size].decode()
        assert raw[nl + 9 + size:nl + 10 + size] == b"\n"
        i = nl + 10 + size
    assert fields_["SYSLOG_IDENTIFIER"] == notify.JOURNAL_TAG == "tm4-alert"
    assert fields_["TM4_EVENT"] == "drift_repaired"
    assert fields_["MESSAGE"] == "drift_repaired: line one\nline two"
    assert fields_["TM4_FOUND"] == "missing" and fields_["TM4_N"] == "3"


def test_journal_datagram_reaches_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "j.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.settimeout(2)
    n = notify.Notifier(journal_socket=str(path), host="pbx1")
    n.event("safe_mode", "SAFE MODE on", until="x")
    data = srv.recv(65536)
    srv.close()
    assert b"SYSLOG_IDENTIFIER\n" in data and b"tm4-alert" in data and b"SAFE MODE on" in data
    assert n.sent[-1]["event"] == "safe_mode" and n.sent[-1]["host"] == "pbx1"


def test_notify_command_gets_json_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "got.json"
    argv = [sys.executable, "-c", f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"]

    async def go() -> None:
        n = notify.Notifier(argv, journal_socket=str(tmp_path / "none"), host="pbx1")
        n.event("repeat_offender", "203.0.113.9 banned again", address="203.0.113.9", offences=2)
        await n.drain()

    asyncio.run(go())
    data = json.loads(out.read_text())
    assert data["event"] == "repeat_offender" and data["address"] == "203.0.113.9" and data["offences"] == 2
    assert data["host"] == "pbx1" and data["time"].endswith("Z")
    # outside an event loop (the CLI) the command runs too
    out.unlink()
    notify.Notifier(argv, journal_socket=str(tmp_path / "none")).event("disabled", "off")
    assert json.loads(out.read_text())["event"] == "disabled"


def test_notify_command_failures_are_logged_never_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        for argv in (["/nonexistent/alert"], [sys.executable, "-c", "import sys; sys.exit(3)"],
                     [sys.executable, "-c", "import time; time.sleep(30)"]):
            n = notify.Notifier(argv, timeout=0.5, journal_socket=str(tmp_path / "none"))
            n.event("config_error", "x")
            await n.drain()

    asyncio.run(go())
    msgs = [r.getMessage() for r in caplog.records if "notify_failed" in r.getMessage()]
    assert len(msgs) == 3
    assert "rc=3" in msgs[1] and "timeout" in msgs[2]


def test_alert_goes_to_the_installed_sink(tmp_path: Path) -> None:
    n = notify.Notifier(journal_socket=str(tmp_path / "none"))
    notify.install(n)
    try:
        notify.alert("dns_stale", "a.example.com stale", entry="home")
    finally:
        notify.install(None)
    assert n.sent[-1]["event"] == "dns_stale" and n.sent[-1]["entry"] == "home"


# -- coexistence ----------------------------------------------------------------------------

def test_neighbours_are_classified() -> None:
    chains = [
        {"family": "inet", "table": "tm4", "name": "input", "hook": "input"},
        {"family": "inet", "table": "firewalld", "name": "filter_INPUT", "hook": "input"},
        {"family": "ip", "table": "filter", "name": "ufw-before-input"},
        {"family": "ip", "table": "filter", "name": "INPUT", "hook": "input"},
        {"family": "ip", "table": "nat", "name": "DOCKER"},
        {"family": "ip", "table": "nat", "name": "POSTROUTING", "hook": "postrouting"},
        {"family": "inet", "table": "mine", "name": "in", "hook": "input"},
        {"family": "ip6", "table": "raw", "name": "PREROUTING", "hook": "prerouting"},
    ]
    got = {n.where: (n.kind, n.input_hook) for n in coexist.classify(chains)}
    assert got == {
        "inet firewalld": ("firewalld", True),
        "ip filter": ("ufw", True),
        "ip nat": ("docker", False),
        "inet mine": ("nftables", True),
        "ip6 raw": ("iptables-nft", False),
    }
    assert coexist.summary([]) == "none (tm4 is the only firewall)"


def test_neighbours_detected_in_a_namespace(lab: object) -> None:
    ns = lab.pbx.ns  # type: ignore[attr-defined]
    script = ("table inet firewalld {\n chain filter_INPUT {\n  type filter hook input priority filter + 10;\n }\n}\n"
              "table ip filter {\n chain INPUT {\n  type filter hook input priority 0;\n }\n"
              " chain ufw-user-input {\n }\n}\n")
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True)
    from tm4.firewall.runner import NftRunner

    found = {n.kind for n in coexist.detect(NftRunner(ns))}
    assert {"firewalld", "ufw"} <= found


# -- drift report ---------------------------------------------------------------------------

def test_drift_report_summary() -> None:
    assert not DriftReport()
    assert DriftReport(missing=True).summary() == "table inet tm4 missing (flushed or deleted)"
    r = DriftReport(rules=["--- applied", "+++ kernel", "@@ -3 +3 @@", "+udp dport 5060 accept"],
                    extra_elements={"wl4_ssh": ["203.0.113.66"]})
    assert r and "rules changed (1 line(s): +udp dport 5060 accept)" in r.summary()
    assert "wl4_ssh: 1 element(s) added from outside (203.0.113.66)" in r.summary()


# -- units, the config skeleton ------------------------------------------------------------

def test_systemd_files_are_the_rendered_units() -> None:
    for name, text in render_units().items():
        assert (ROOT / "systemd" / name).read_text() == text, f"regenerate systemd/{name}"
    boot = render_units()["tm4-boot.service"]
    for line in ("DefaultDependencies=no", "Before=network-pre.target shutdown.target", "Type=oneshot",
                 "ExecStart=/usr/local/bin/tm4d --boot --config /etc/tm4/tm4.toml"):
        assert line in boot.splitlines()
    d = render_units()["tm4d.service"].splitlines()
    assert "Restart=on-failure" in d and "Type=notify" in d
    assert not any(line.startswith("ExecStop") for line in d)  # stopping leaves the rules in force
    assert any("AF_NETLINK" in line for line in d) and any("CAP_NET_ADMIN" in line for line in d)


def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        if IN_CI:
            pytest.fail("systemd-analyze missing (Debian package systemd)")
        pytest.skip("no systemd-analyze")
    fake = tmp_path / "tm4d"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    for name, text in render_units(str(fake)).items():
        (tmp_path / name).write_text(text)
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "tm4-boot.service"),
                        str(tmp_path / "tm4d.service")], capture_output=True, text=True,
                       env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
    problems = [ln for ln in (p.stdout + p.stderr).splitlines()
                if "tm4" in ln and "asterisk.service" not in ln]
    assert p.returncode == 0 and not problems, p.stdout + p.stderr


def test_config_example_is_the_skeleton_and_covers_every_key() -> None:
    text = (ROOT / "etc" / "tm4.toml.example").read_text()
    assert text == config_skeleton(), "regenerate: tm4 init --skeleton > etc/tm4.toml.example"
    cfg = parse_config(tomllib.loads(text))  # as shipped: all defaults
    assert cfg.daemon.socket == "/run/tm4/tm4.sock"
    lines = text.splitlines()
    for section, cls in _SECTIONS.items():
        start = lines.index(f"[{section}]")
        block = lines[start + 1:]
        for f in fields(cls):
            want = f"#{f.name} = {toml_value(getattr(cls(), f.name))}"
            assert want in block[:200], f"[{section}] {f.name} missing from the example"
    # uncommenting every key gives a config that loads with exactly the defaults
    uncommented = "\n".join(ln[1:] if ln.startswith("#") and " = " in ln and not ln.startswith("#[")
                            and not ln.startswith("#ports") else ln for ln in lines)
    assert parse_config(tomllib.loads(uncommented)).daemon == cfg.daemon


def test_skeleton_with_values_keeps_the_admins_settings() -> None:
    existing = {"state_dir": "/srv/tm4", "firewall": {"rtp": "14000-15000", "public_services": ["sip-udp"]},
                "services": {"sip-udp": {"ports": "5062"}, "pbxweb": {"proto": "tcp", "ports": "8443"}}}
    detected = {"firewall": {"rtp": "12000-13000"}, "services.sip-udp": {"ports": "5080"},
                "services.sip-tls": {"ports": "5071"}}
    cfg = parse_config(tomllib.loads(config_skeleton(merge_values(existing, detected))))
    assert str(cfg.state_dir) == "/srv/tm4"
    assert cfg.firewall.rtp == "14000-15000" and cfg.firewall.public_services == ["sip-udp"]
    assert cfg.services["sip-udp"].ports == ((5062, 5062),)  # the admin's value wins
    assert cfg.services["sip-tls"].ports == ((5071, 5071),)  # detected
    assert cfg.services["pbxweb"].ports == ((8443, 8443),)


def test_status_lines_for_tm4_status(lab: object, tmp_path: Path) -> None:
    """What `tm4 status` shows from tm4d's side: safe mode, the daemon, other firewalls."""
    from datetime import timedelta

    from tm4.core.config import load_config
    from tm4.daemon.main import status_extra
    from tm4.firewall.nft import NftBackend
    from tm4.ops import safemode
    from tm4.ops.engine import Core

    ns = lab.pbx.ns  # type: ignore[attr-defined]
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "s"}"\n[daemon]\nsocket = "{tmp_path / "no.sock"}"\n')
    core = Core(load_config(cfg), backend=NftBackend(netns=ns), protect=[])
    assert status_extra(core) == {"safe mode": "off", "tm4d": "not running",
                                  "other firewalls": "none (tm4 is the only firewall)"}
    safemode.record_boot(core, "prev", timedelta(minutes=1), safemode.utcnow())
    safemode.evaluate(core, current="now", up=timedelta(minutes=1))
    core.apply()
    subprocess.run(["ip", "netns", "exec", ns, "nft", "add", "table", "inet", "firewalld"], check=True)
    got = status_extra(core)
    assert got["safe mode"].startswith("ON until ") and "tm4 safe-mode off" in got["safe mode"]
    assert got["other firewalls"] == "firewalld (inet firewalld)"
