"""fail2ban side by side, with Debian's real fail2ban: a whitelisted phone's wrong passwords
are never banned, an attacker's still are.

The server runs inside a test namespace with its own socket, pid file, database and log
in tmp, the stock asterisk jail (filter.d/asterisk.conf as shipped) reading a log file
the test writes in Asterisk's security log format, banaction nftables inside the
namespace. Everything is stopped in `finally`; the whole test stays well under 60 s.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import need_root_tools
from netlab import wait_for

from tm4.core.config import parse_config
from tm4.core.model import Entry, Origin, Source, utcnow
from tm4.ops.engine import Core
from tm4.sources import fail2ban as f2b_mod

# One line of the capture tests/fixtures/asterisk-22 copies from Asterisk 22's security
# log (res_security_log.c, a failed digest), with the time and addresses as placeholders.
SECURITY_LINE = (
    '[{ts}] SECURITY[12829] res_security_log.c: SecurityEvent="ChallengeResponseFailed",'
    'EventTV="{tv}",Severity="Error",Service="PJSIP",EventVersion="1",AccountID="<unknown>",'
    'SessionID="1-12989@{src}",LocalAddress="IPV4/UDP/203.0.113.1/5060",'
    'RemoteAddress="IPV4/UDP/{src}/5071",Challenge="1795236561/1c222d0bfb8d25e666cf0ae180ca2d86",'
    'Response="6e6577b930a533c35eaa1d52f839dc38",ExpectedResponse=""'
)


def entry(name: str, *sources: str, expires: datetime | None = None,
          resolved: dict[str, tuple[ipaddress.IPv4Network, ...]] | None = None) -> Entry:
    return Entry(name, tuple(Source.parse(s) for s in sources), ("sip-udp",), Origin.ADMIN, utcnow(), expires,
                 "", dict(resolved or {}))


def test_ignore_list_is_the_whitelist_now() -> None:
    now = utcnow()
    es = [entry("office", "203.0.113.0/28"), entry("inside", "203.0.113.5"),
          entry("v6", "2001:db8:7::/48"), entry("gone", "198.51.100.9", expires=now - timedelta(seconds=1)),
          entry("ddns", "pbx.example.org", resolved={"pbx.example.org": (ipaddress.ip_network("198.51.100.20"),)})]
    assert f2b_mod.ignore_list(es, now) == ["198.51.100.20", "203.0.113.0/28", "2001:db8:7::/48"]


def test_dropin_sets_ignoreip_of_the_managed_jails() -> None:
    text = f2b_mod.render_dropin([f"203.0.113.{i}" for i in range(10)], ["asterisk", "sshd"])
    assert text.startswith("# Written by tm4")
    assert "[asterisk]\nignoreip = 127.0.0.1/8 ::1 203.0.113.0" in text and "\n[sshd]\nignoreip = " in text
    assert "\n    203.0.113.6 203.0.113.7 203.0.113.8 203.0.113.9\n" in text  # continuation line
    with pytest.raises(ValueError):
        f2b_mod.render_dropin([], ["bad jail]\n[x"])


def test_write_dropin_only_when_changed(tmp_path: Path) -> None:
    p = tmp_path / "jail.d" / "tm4-ignoreip.local"
    assert f2b_mod.write_dropin(p, "a\n") and p.read_text() == "a\n"
    assert not f2b_mod.write_dropin(p, "a\n")
    assert f2b_mod.write_dropin(p, "b\n") and oct(p.stat().st_mode & 0o777) == "0o644"
    assert [x.name for x in p.parent.iterdir()] == ["tm4-ignoreip.local"]


def test_debounce_waits_for_the_whitelist_to_be_still() -> None:
    d = f2b_mod.Debounce(settle=5)
    assert not d.ready("a", 0) and not d.ready("a", 4.9) and d.ready("a", 5)
    d.done("a")
    assert not d.ready("a", 100)
    assert not d.ready("b", 100) and not d.ready("c", 103) and not d.ready("c", 107.9)  # a burst
    assert d.ready("c", 108)


class F2bLab:
    """A private fail2ban-server in a namespace: conf, socket, pid, db and log in tmp."""

    def __init__(self, tmp: Path, ns: str):
        self.ns = ns
        self.dir = tmp / "f2b"
        conf = self.dir / "conf"
        conf.mkdir(parents=True)
        for item in ("fail2ban.conf", "jail.conf", "filter.d", "action.d", "paths-common.conf",
                     "paths-debian.conf"):
            src = Path("/etc/fail2ban") / item
            (shutil.copytree if src.is_dir() else shutil.copy)(src, conf / item)
        (conf / "jail.d").mkdir()
        self.log = self.dir / "security.log"
        self.log.touch()
        self.sock = self.dir / "f2b.sock"
        (conf / "fail2ban.local").write_text(
            f"[Definition]\nloglevel = INFO\nlogtarget = {self.dir}/f2b.log\nsocket = {self.sock}\n"
            f"pidfile = {self.dir}/f2b.pid\ndbfile = {self.dir}/f2b.sqlite3\n")
        # The stock asterisk jail, reading our log; polling so no inotify/systemd is needed.
        (conf / "jail.local").write_text(
            "[DEFAULT]\nbanaction = nftables-multiport\nbanaction_allports = nftables-allports\n"
            f"[asterisk]\nenabled = true\nlogpath = {self.log}\nbackend = polling\nmaxretry = 3\n"
            "findtime = 600\nbantime = 600\n")
        self.conf = conf
        self.client = ("fail2ban-client", "-c", str(conf), "-s", str(self.sock))
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "fail2ban-server", "-f", "-x", "-c", str(self.conf),
             "-s", str(self.sock), "-p", str(self.dir / "f2b.pid")],
            stdout=subprocess.DEVNULL, stderr=(self.dir / "server.err").open("w"), text=True)
        assert wait_for(lambda: self.client_ok("ping"), timeout=15), (self.dir / "server.err").read_text()

    def client_ok(self, *args: str) -> bool:
        return subprocess.run([*self.client, *args], capture_output=True, timeout=10).returncode == 0

    def banned(self) -> str:
        return subprocess.run([*self.client, "status", "asterisk"], capture_output=True, text=True,
                              timeout=10).stdout

    def fail(self, src: str, times: int = 4) -> None:
        now = datetime.now(UTC)
        with self.log.open("a") as f:
            for _ in range(times):
                f.write(SECURITY_LINE.format(ts=now.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                                             tv=now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000",
                                             src=src) + "\n")

    def stop(self) -> None:
        if self.proc is None:
            return
        subprocess.run([*self.client, "stop"], capture_output=True, timeout=15)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None


@pytest.fixture
def netns() -> Iterator[str]:
    need_root_tools("ip", "nft", "fail2ban-server", "fail2ban-client")
    name = f"tm4f2b{int(time.time() * 1000) % 10**8}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_fail2ban_never_bans_a_whitelisted_phone_but_still_bans_an_attacker(tmp_path: Path, netns: str) -> None:
    started = time.monotonic()
    lab = F2bLab(tmp_path, netns)
    f2b = f2b_mod.Fail2ban(dropin=lab.conf / "jail.d" / "tm4-ignoreip.local", client=lab.client)
    core = Core(parse_config({"state_dir": str(tmp_path / "s"), "firewall": {"netns": netns}}), protect=[])
    core.allow("phone", ["203.0.113.70"], ["sip-udp"])
    assert f2b_mod.status_lines(core, f2b) == {"fail2ban": "installed, not running"}
    assert f2b_mod.sync(core, f2b).written  # before the server starts: it reads the drop-in
    try:
        lab.start()
        st = f2b_mod.status_lines(core, f2b)
        assert st["fail2ban"] == "running, jails: asterisk"
        assert st["fail2ban ignore lists"] == "current (asterisk)"

        lab.fail("203.0.113.66")
        lab.fail("203.0.113.70")
        assert wait_for(lambda: "203.0.113.66" in lab.banned(), timeout=20), lab.banned()
        assert "203.0.113.70" not in lab.banned()
        ruleset = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "ruleset"],
                                 capture_output=True, text=True, check=True).stdout
        assert "203.0.113.66" in ruleset and "203.0.113.70" not in ruleset

        # A new whitelisted user: out of date until the (debounced) sync reloads the jail.
        core.allow("laptop", ["198.51.100.7"], ["sip-udp"])
        assert f2b_mod.status_lines(core, f2b)["fail2ban ignore lists"].startswith("OUT OF DATE: asterisk (1 ")
        res = f2b_mod.sync(core, f2b)
        assert res.written and res.reloaded == ["asterisk"] and res.failed == []
        assert f2b_mod.status_lines(core, f2b)["fail2ban ignore lists"] == "current (asterisk)"
        assert not f2b_mod.sync(core, f2b).written  # nothing changed: no reload
        lab.fail("198.51.100.7")
        lab.fail("203.0.113.67")
        assert wait_for(lambda: "203.0.113.67" in lab.banned(), timeout=20), lab.banned()
        assert "198.51.100.7" not in lab.banned() and "203.0.113.70" not in lab.banned()
        # Banned first, whitelisted after (a user who dials in): let out at the sync.
        core.allow("dialled-in", ["203.0.113.67"], ["sip-udp"])
        res = f2b_mod.sync(core, f2b)
        assert res.unbanned == ["asterisk 203.0.113.67"], res
        assert "203.0.113.67" not in lab.banned()
    finally:
        lab.stop()
    assert time.monotonic() - started < 60


def test_tm4d_leaves_the_hosts_fail2ban_alone_when_it_guards_a_namespace() -> None:
    from tm4.daemon import components

    [comp] = [c for c in components.default_components() if c.name == "fail2ban"]
    assert comp.module == "tm4.sources.fail2ban"
    assert not comp.wanted(parse_config({"firewall": {"netns": "tm4-lab"}}))
    assert comp.wanted(parse_config({})) == f2b_mod.Fail2ban().installed()


def test_tm4d_component_writes_the_dropin_once_fail2ban_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import contextlib
    from types import SimpleNamespace

    from tm4.daemon import components

    monkeypatch.setenv("TM4_NFT_SUBPROCESS", "1")
    core = Core(parse_config({"state_dir": str(tmp_path / "s"), "firewall": {"netns": "tm4-test-none"}}),
                protect=[])
    core.allow("phone", ["203.0.113.70"], ["sip-udp"])
    dropin = tmp_path / "jail.d" / "tm4-ignoreip.local"
    stopped = f2b_mod.Fail2ban(dropin=dropin, client=("false",))  # fail2ban-client fails: not running
    up = f2b_mod.Fail2ban(dropin=dropin, client=("echo", "pong"))  # answers ping, no jails
    current = [stopped]
    settles: list[float] = []

    def debounce(settle: float) -> f2b_mod.Debounce:
        settles.append(settle)
        return f2b_mod.Debounce(settle=0.0)

    mod = SimpleNamespace(**{k: getattr(f2b_mod, k) for k in ("ignore_list", "digest", "push", "settle_seconds")},
                          Fail2ban=SimpleNamespace(from_config=lambda cfg: current[0]), Debounce=debounce)

    async def run(seconds: float) -> None:
        task = asyncio.ensure_future(components._run_fail2ban(SimpleNamespace(core=core), mod))  # type: ignore[arg-type]
        await asyncio.sleep(seconds)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run(0.5))
    assert not dropin.exists()  # fail2ban stopped: nothing written on its host
    current[0] = up
    asyncio.run(run(0.5))
    assert "203.0.113.70" in dropin.read_text()
    assert settles == [5.0, 5.0]  # [fail2ban] debounce's default
