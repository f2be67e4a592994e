"""[fail2ban] in tm4.toml: where the drop-in goes, which jails, the debounce, and whether
tm4 manages fail2ban at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tm4.core.config import parse_config
from tm4.core.errors import ConfigError
from tm4.ops.engine import Core
from tm4.sources import fail2ban as f2b_mod


def test_defaults_are_debians_paths_the_asterisk_and_sshd_jails_and_5s() -> None:
    cfg = parse_config({})
    f2b = f2b_mod.Fail2ban.from_config(cfg)
    assert f2b.dropin == Path("/etc/fail2ban/jail.d/tm4-ignoreip.local") == f2b_mod.DROPIN
    assert tuple(f2b.jails) == ("asterisk", "sshd") == f2b_mod.JAILS
    assert f2b_mod.settle_seconds(cfg) == 5.0 == f2b_mod.SETTLE
    assert cfg.fail2ban.enabled == "auto"


def test_settings_reach_the_dropin_and_the_debounce(tmp_path: Path) -> None:
    cfg = parse_config({"fail2ban": {"jail_d": str(tmp_path / "jail.d"), "jails": ["asterisk-iptables", "recidive"],
                                     "debounce": "1m30s"}})
    f2b = f2b_mod.Fail2ban.from_config(cfg)
    assert f2b.dropin == tmp_path / "jail.d" / "tm4-ignoreip.local"
    assert f2b_mod.settle_seconds(cfg) == 90.0
    res = f2b_mod.push(f2b, ["203.0.113.70"])
    assert res is not None and res.written
    text = f2b.dropin.read_text()
    assert "[asterisk-iptables]\nignoreip = 127.0.0.1/8 ::1 203.0.113.70\n" in text
    assert "[recidive]\n" in text and "[sshd]" not in text


@pytest.mark.parametrize(("enabled", "netns", "in_netns", "want"), [
    (True, "", False, True),
    (True, "tm4-lab", True, True),  # the admin said so: even for a namespace
    (False, "", False, False),
    ("auto", "tm4-lab", False, False),
    ("auto", "", True, False),
])
def test_enabled_true_false_and_auto(enabled: object, netns: str, in_netns: bool, want: bool) -> None:
    cfg = parse_config({"fail2ban": {"enabled": enabled}, "firewall": {"netns": netns}})
    assert f2b_mod.wanted(cfg, in_netns) is want


def test_auto_on_the_host_follows_whether_fail2ban_is_installed(tmp_path: Path) -> None:
    absent = parse_config({"fail2ban": {"jail_d": str(tmp_path / "no" / "jail.d")}})
    assert not f2b_mod.wanted(absent, False)  # no fail2ban directory here
    expected = f2b_mod.Fail2ban.from_config(parse_config({})).installed()
    assert f2b_mod.wanted(parse_config({}), False) is expected


def test_disabled_status_says_so_and_names_a_leftover_dropin(tmp_path: Path) -> None:
    jail_d = tmp_path / "jail.d"
    cfg = parse_config({"state_dir": str(tmp_path / "s"), "fail2ban": {"enabled": False, "jail_d": str(jail_d)}})
    core = Core(cfg, protect=[])
    assert f2b_mod.status_lines(core) == {"fail2ban": "not managed ([fail2ban] enabled = false)"}
    jail_d.mkdir()
    (jail_d / "tm4-ignoreip.local").write_text("[sshd]\nignoreip = 127.0.0.1/8\n")
    assert "old drop-in" in f2b_mod.status_lines(core)["fail2ban"]


@pytest.mark.parametrize(("section", "msg"), [
    ({"enabled": "yes"}, '[fail2ban] enabled: must be "auto", true or false, got "yes"'),
    ({"enabled": 1}, '[fail2ban] enabled: must be "auto", true or false, got 1'),
    ({"jails": []}, "[fail2ban] jails: must hold at least 1"),
    ({"jails": ["asterisk", "asterisk"]}, "[fail2ban] jails: names a jail twice"),
    ({"jails": ["a]b"]}, "[fail2ban] jails[0]: a jail name must be"),
    ({"jails": "asterisk"}, "[fail2ban] jails: must be a list"),
    ({"debounce": "500ms"}, "[fail2ban] debounce"),
    ({"debounce": "11m"}, "[fail2ban] debounce: must be 1s to 10m"),
    ({"jail_d": "fail2ban/jail.d"}, "[fail2ban] jail_d: must be an absolute path"),
    ({"reload": True}, "[fail2ban] reload: unknown key"),
])
def test_bad_settings_are_refused_naming_the_key(section: dict[str, object], msg: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"fail2ban": section})
    assert msg in str(exc.value)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["enabled", "jail_d", "jails", "debounce"]),
                       st.one_of(st.booleans(), st.integers(), st.text(max_size=30),
                                 st.lists(st.text(max_size=70), max_size=70))))
def test_any_section_is_either_refused_in_one_line_or_renders_a_safe_dropin(section: dict[str, object]) -> None:
    try:
        cfg = parse_config({"fail2ban": section})
    except ConfigError as exc:
        assert "\n" not in str(exc) and "[fail2ban]" in str(exc)
        return
    f = cfg.fail2ban
    assert f.enabled in ("auto", "true", "false") and f.jail_d.startswith("/")
    assert 1.0 <= f2b_mod.settle_seconds(cfg) <= 600.0
    text = f2b_mod.render_dropin(["203.0.113.70"], f.jails)  # never raises for a jail the config let in
    assert text.count("ignoreip = ") == len(f.jails)


def test_real_fail2ban_honours_the_configured_jails_only(tmp_path: Path) -> None:
    """Debian's fail2ban with two jails on one log: tm4 manages only the jail [fail2ban]
    jails names (pbx-sip); there a whitelisted phone is never banned, while the stock
    asterisk jail, left to the admin, bans it like anyone."""
    import dataclasses
    import subprocess
    import time

    from conftest import need_root_tools
    from netlab import wait_for
    from test_fail2ban import F2bLab

    need_root_tools("ip", "nft", "fail2ban-server", "fail2ban-client")
    ns = f"tm4f2bc{int(time.time() * 1000) % 10**8}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    lab = F2bLab(tmp_path, ns)
    try:
        with (lab.conf / "jail.local").open("a") as f:
            f.write(f"[pbx-sip]\nenabled = true\nfilter = asterisk\nlogpath = {lab.log}\nbackend = polling\n"
                    "maxretry = 3\nfindtime = 600\nbantime = 600\n")
        cfg = parse_config({"state_dir": str(tmp_path / "s"), "firewall": {"netns": ns},
                            "fail2ban": {"enabled": True, "jail_d": str(lab.conf / "jail.d"), "jails": ["pbx-sip"],
                                         "debounce": "2s"}})
        assert f2b_mod.wanted(cfg, True)
        f2b = dataclasses.replace(f2b_mod.Fail2ban.from_config(cfg), client=lab.client)
        core = Core(cfg, protect=[])
        core.allow("phone", ["203.0.113.70"], ["sip-udp"])
        assert f2b_mod.sync(core, f2b).written
        lab.start()
        assert f2b_mod.status_lines(core, f2b)["fail2ban ignore lists"] == "current (pbx-sip)"

        def banned(jail: str) -> str:
            return subprocess.run([*lab.client, "status", jail], capture_output=True, text=True, timeout=10).stdout

        lab.fail("203.0.113.70")
        lab.fail("203.0.113.66")
        assert wait_for(lambda: "203.0.113.66" in banned("pbx-sip") and "203.0.113.70" in banned("asterisk"),
                        timeout=20), banned("pbx-sip") + banned("asterisk")
        assert "203.0.113.70" not in banned("pbx-sip")
    finally:
        lab.stop()
        subprocess.run(["ip", "netns", "del", ns], check=False)
