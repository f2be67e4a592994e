"""tm4d for real in a network namespace: start-up, SIGHUP, drift repair, kill -9, concurrency."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import Tm4d, wait_until
from netlab import Echo, Lab

from tm4.core.errors import ConfigError
from tm4.core.model import Ban, Origin, parse_network, utcnow
from tm4.core.rules import ban_set, interval, wl_set
from tm4.firewall.plan import kernel_intervals
from tm4.ops import drift
from tm4.ops.engine import Core, _rules_part

PHONE = "198.51.100.10"
ATTACKER = "203.0.113.66"


@pytest.fixture
def net(lab: Lab) -> Iterator[tuple[Lab, Echo]]:
    lab.client("phone", [f"{PHONE}/24"])
    lab.client("attacker", [f"{ATTACKER}/24"])
    echo = Echo(lab.pbx, udp=[5060], tcp=[22])
    try:
        yield lab, echo
    finally:
        echo.close()


def phone_sip(lab: Lab) -> bool:
    return lab.hosts[1].udp_probe("198.51.100.1", 5060)


def attacker_sip(lab: Lab) -> bool:
    return lab.hosts[2].udp_probe("203.0.113.1", 5060, timeout=0.3)


def test_start_applies_stored_state_and_whitelist_beats_restored_bans(net: tuple[Lab, Echo], tm4d: Tm4d) -> None:
    lab, _ = net
    core = tm4d.core()  # no table in the kernel yet: changes go to the store only
    core.allow("office", ["198.51.100.0/24"], ["sip-udp"])
    core.block(ATTACKER, reason="test")
    # A ban saved before the whitelist covered it (e.g. by an older tm4): must not survive start-up.
    core.store.put_ban(Ban(parse_network("198.51.100.10"), reason="stale", origin=Origin.GUARD))
    assert tm4d.nft("list", "tables").strip() == ""

    tm4d.start()
    assert kernel_set(core, "sip-udp") == {interval(parse_network("198.51.100.0/24"))}
    assert kernel_set(core, None) == {interval(parse_network(ATTACKER))}
    assert [b.address for b in core.bans()] == [ATTACKER]
    lifted = [r for r in core.store.audit_log(20) if r.action == "unblock" and r.subject == PHONE]
    assert lifted and "whitelisted by office" in lifted[-1].detail["because"]
    # and real packets agree
    assert phone_sip(lab)
    assert not attacker_sip(lab)


def test_sighup_with_broken_config_keeps_running_config(net: tuple[Lab, Echo], tm4d: Tm4d) -> None:
    lab, _ = net
    tm4d.start()
    assert not attacker_sip(lab)
    rules_before = _rules_part(tm4d.nft("list", "table", "inet", "tm4"))

    tm4d.write_config(raw="state_dir = [broken\n")
    tm4d.signal(signal.SIGHUP)
    assert wait_until(lambda: tm4d.call("status")["last_reload_error"], 5), tm4d.log()
    assert tm4d.alive()
    st = tm4d.call("status")
    assert "not valid TOML" in st["last_reload_error"]
    assert st["reloads"] == 0
    assert _rules_part(tm4d.nft("list", "table", "inet", "tm4")) == rules_before
    assert not attacker_sip(lab)
    tm4d.call("allow", name="phone", sources=[PHONE], services=["sip-udp"])  # still serving
    assert phone_sip(lab)

    # A unknown key is refused the same way.
    tm4d.write_config("[firewall]\nno_such_key = 1\n")
    tm4d.signal(signal.SIGHUP)
    assert wait_until(lambda: "no_such_key" in (tm4d.call("status")["last_reload_error"] or ""), 5)

    # A good config is taken: SIP becomes public, and the attacker's packets get through.
    tm4d.write_config('[firewall]\npublic_services = ["sip-udp"]\n')
    tm4d.signal(signal.SIGHUP)
    assert wait_until(lambda: tm4d.call("status")["reloads"] == 1, 5), tm4d.log()
    assert tm4d.call("status")["last_reload_error"] is None
    assert attacker_sip(lab)
    assert "reload_failed" in tm4d.log()


def test_table_flushed_or_changed_from_outside_is_restored(net: tuple[Lab, Echo], tm4d: Tm4d,
                                                          tmp_path: Path) -> None:
    lab, _ = net
    got = tmp_path / "alerts.jsonl"
    hook = f"import sys; open({str(got)!r}, 'a').write(sys.stdin.read())"
    tm4d.write_config(f"notify_command = [{json.dumps(sys.executable)}, \"-c\", {json.dumps(hook)}]\n")
    tm4d.start()
    expected = _rules_part(tm4d.nft("list", "table", "inet", "tm4"))
    assert not attacker_sip(lab)

    # 1. `systemctl restart nftables` does `flush ruleset`: everything is open until tm4d notices.
    t0 = time.monotonic()
    tm4d.nft("flush", "ruleset")
    assert attacker_sip(lab)
    took = wait_until(lambda: _rules_part(tm4d.nft("list", "table", "inet", "tm4", check=False)) == expected, 5)
    assert took is not None, tm4d.log()
    assert not attacker_sip(lab)
    print(f"flush ruleset -> restored in {time.monotonic() - t0:.2f}s")

    # 2. a rule slipped in from outside is taken out again
    tm4d.nft("insert", "rule", "inet", "tm4", "input", "udp", "dport", "5060", "accept")
    assert attacker_sip(lab)
    assert wait_until(lambda: not attacker_sip(lab), 5) is not None, tm4d.log()
    assert _rules_part(tm4d.nft("list", "table", "inet", "tm4")) == expected

    # 3. an element added to a whitelist set from outside goes too (elements are compared
    #    on every 5th check)
    tm4d.nft("add", "element", "inet", "tm4", wl_set("sip-udp", 4), "{", ATTACKER, "}")
    assert attacker_sip(lab)
    assert wait_until(lambda: not attacker_sip(lab), 10) is not None, tm4d.log()

    # 4. a repeat offender is worth a human too
    tm4d.call("block", address="203.0.113.99", ttl="1h", origin="guard", reason="5 failures")
    tm4d.call("unblock", address="203.0.113.99")
    tm4d.call("block", address="203.0.113.99", ttl="1d", origin="guard", reason="5 failures again",
              offences=2)  # the guard counts offences from the store's memory of offenders
    assert wait_until(lambda: got.exists() and "repeat_offender" in got.read_text(), 5), got.read_text()
    # a dial-in lock-out, as tm4.dialin.limits records it (in any process)
    tm4d.core().audit("dialin-lockout", "5550100", Origin.DIALIN, "callerid=5550100", failures=5)
    assert wait_until(lambda: "dialin_lockout" in got.read_text(), 5), got.read_text()

    st = tm4d.call("status")
    assert st["drift"]["repairs"] == 3
    audit = [r for r in tm4d.core().store.audit_log(50) if r.action == "drift-repair"]
    assert len(audit) == 3 and "missing" in audit[0].detail["found"]
    assert wait_until(lambda: got.exists() and got.read_text().count("drift_repaired") == 3, 5)
    first = json.loads(got.read_text().splitlines()[0])
    assert first["event"] == "drift_repaired" and "flushed" in first["message"]


def test_drift_ignores_and_keeps_kernel_filled_sets(lab: Lab, tm4d: Tm4d) -> None:
    tm4d.write_config("[knock]\nenabled = true\nports = [31001, 32002, 33003]\n")
    tm4d.start()
    # a completed knock and a half-done one, as the kernel itself would record them
    tm4d.nft("add", "element", "inet", "tm4", "knocked4", "{", "198.51.100.77", "timeout", "1h", "}")
    listing = tm4d.nft("list", "table", "inet", "tm4").split()
    stage = next(n for n in listing if n.startswith("knock4_"))
    tm4d.nft("add", "element", "inet", "tm4", stage, "{", "198.51.100.78", "}")
    time.sleep(6)  # more than one element comparison (every 5th check at 1 s)
    assert tm4d.call("status")["drift"]["repairs"] == 0
    assert not drift.check(tm4d.core())

    tm4d.nft("insert", "rule", "inet", "tm4", "input", "tcp", "dport", "2222", "accept")
    assert wait_until(lambda: tm4d.call("status")["drift"]["repairs"] == 1, 5), tm4d.log()
    knocked = tm4d.nft("list", "set", "inet", "tm4", "knocked4")
    assert "198.51.100.77" in knocked  # carried over the full re-apply
    assert "198.51.100.78" in tm4d.nft("list", "set", "inet", "tm4", stage)
    assert "2222" not in tm4d.nft("list", "chain", "inet", "tm4", "input")


def kernel_set(core: Core, service: str | None) -> set[tuple[int, int]]:
    """The kernel's IPv4 elements for a service's whitelist (None: the bans), host set
    and network set together."""
    out: set[tuple[int, int]] = set()
    for net in (False, True):
        name = ban_set(4, net) if service is None else wl_set(service, 4, net)
        got = kernel_intervals(core.backend, name)  # type: ignore[arg-type]
        assert got is not None, f"{name} missing: the table is not whole"
        out |= got
    return out


def _kernel_bans(d: Tm4d) -> set[tuple[int, int]]:
    return kernel_set(d.core(), None)


def _store_bans(core: Core, block: int, n: int) -> set[tuple[int, int]]:
    """Replace every ban in the store (as another process would) with n addresses of 10.block/16."""
    base = int(ipaddress.IPv4Address(f"10.{block}.0.0"))
    new = {(base + 2 * i, base + 2 * i) for i in range(n)}
    with core.store.transaction() as db:
        db.execute("DELETE FROM bans")
        now = utcnow()
        for lo, _ in new:
            core.store.put_ban(Ban(parse_network(str(ipaddress.IPv4Address(lo))), reason="kill9",
                                   origin=Origin.ADMIN, created=now))
    return new


def test_kill9_mid_apply_leaves_previous_rules_and_consistent_store(lab: Lab, tm4d: Tm4d) -> None:
    n = 15000
    tm4d.start()
    core = tm4d.core()
    rules = _rules_part(tm4d.nft("list", "table", "inet", "tm4"))
    # How long one apply of this size takes, request to reply:
    previous = _store_bans(core, 99, n)
    t0 = time.monotonic()
    tm4d.call("apply")
    apply_s = time.monotonic() - t0
    outcomes = []
    for it, frac in enumerate((0.5, 0.8, 0.87, 0.91, 0.95, 1.1)):
        new = _store_bans(core, it, n)
        # tm4d is told to apply the new state, and killed at a random moment of that apply
        t = threading.Thread(target=lambda: _apply_quietly(tm4d), daemon=True)
        delay = frac * apply_s
        t.start()
        time.sleep(delay)
        tm4d.kill9()
        t.join(5)
        got = _kernel_bans(tm4d)
        assert got in (previous, new), f"iteration {it}: {len(got)} bans, neither old nor new"
        assert _rules_part(tm4d.nft("list", "table", "inet", "tm4")) == rules
        outcomes.append("new" if got == new else "old")
        # the store is whole: integrity, and the new state is all there
        db = sqlite3.connect(core.store.path)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM bans").fetchone()[0] == n
        db.close()
        # restarting puts the store's state in force
        tm4d.start()
        assert _kernel_bans(tm4d) == new
        previous = new
        print(f"iteration {it}: killed {delay * 1000:.0f} ms into a {apply_s * 1000:.0f} ms apply"
              f" -> kernel held the {outcomes[-1]} set, whole")
    # kill during a stream of single changes: after restart store and kernel agree exactly
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            try:
                tm4d.call("allow", name=f"k{i}", sources=[f"192.0.2.{10 + i % 200}"], services=["sip-udp"],
                          replace=True)
            except Exception:
                return
            i += 1

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    time.sleep(0.4)
    tm4d.kill9()
    stop.set()
    w.join(5)
    tm4d.start()
    assert not drift.check(tm4d.core()), "kernel and store disagree after kill -9 and restart"
    print("outcomes:", outcomes)


def _apply_quietly(d: Tm4d) -> None:
    with contextlib.suppress(Exception):
        d.call("apply")


def test_hundred_concurrent_clients_lose_nothing(lab: Lab, tm4d: Tm4d) -> None:
    from tm4.dialin.passcodes import PasscodeBook

    tm4d.write_config('[dialin]\nexternal_address = "192.0.2.1"\n')
    core = tm4d.core()
    book = PasscodeBook.open(core.store, core.config.state_dir)
    codes = {f"user{i}": book.add(f"user{i}", f"{700000 + i * 7919}") for i in range(40)}
    tm4d.start()

    def dialin(i: int) -> object:
        from tm4.ops.control import Client

        with Client(tm4d.socket) as c:
            s = c.call("dialin.verify", {"passcode": codes[f"user{i}"], "callerid": f"55500{i:02d}"})
            assert s["ok"], s
            return c.call("dialin.grant", {"token": s["token"], "address": f"198.51.100.{100 + i}",
                                           "callerid": f"55500{i:02d}"})

    jobs = [lambda i=i: dialin(i) for i in range(40)]
    jobs += [lambda i=i: tm4d.call("allow", name=f"cli{i}", sources=[f"192.0.2.{100 + i}"],
                                   services=["sip-udp", "ssh"]) for i in range(40)]
    jobs += [lambda i=i: tm4d.call("block", address=f"203.0.113.{100 + i}", ttl="1h", origin="guard",
                                   reason="guard test") for i in range(20)]
    random.Random(1).shuffle(jobs)
    barrier = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def run(job: object) -> None:
        barrier.wait()
        try:
            job()  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    took = time.monotonic() - t0
    assert not errors, errors[:3]
    entries = {e.name: e for e in core.entries()}
    assert sum(n.startswith("dialin-") for n in entries) == 40
    assert sum(n.startswith("cli") for n in entries) == 40
    assert len([b for b in core.bans() if b.origin == Origin.GUARD]) == 20
    wl = kernel_set(core, "sip-udp")
    for i in range(40):
        for a in (f"198.51.100.{100 + i}", f"192.0.2.{100 + i}"):
            assert interval(parse_network(a)) in wl, a
    assert len(_kernel_bans(tm4d)) == 20
    assert not drift.check(core)
    print(f"100 concurrent clients served in {took:.2f}s")


def test_config_applied_behind_tm4ds_back_is_not_reverted(net: tuple[Lab, Echo], tm4d: Tm4d) -> None:
    """An admin edits tm4.toml and applies it directly: tm4d (still on the old config) must not
    call that drift and put the old rules back; `apply` through the socket reloads first."""
    lab, _ = net
    tm4d.start()
    assert not attacker_sip(lab)
    tm4d.write_config('[firewall]\npublic_services = ["sip-udp"]\n')
    tm4d.core().apply()  # the new config, straight into the kernel
    assert attacker_sip(lab)
    time.sleep(6)  # several rule checks and one element check
    assert attacker_sip(lab)
    assert tm4d.call("status")["drift"]["repairs"] == 0
    assert "event=config_differs" in tm4d.log()
    res = tm4d.call("apply")  # what `tm4 apply` sends when tm4d runs
    assert res["applied"] and "firewall" in res["changed"]
    assert tm4d.call("status")["reloads"] == 1
    tm4d.write_config(raw="[firewall\n")
    with pytest.raises(ConfigError, match="config is broken"):
        tm4d.call("apply")
    assert attacker_sip(lab)  # the running configuration stays in force
