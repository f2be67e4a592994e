"""`tm4 lab` end to end, as the README's quick start runs it, and its clean-up on Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import IN_CI, need_root_tools

TM4 = [sys.executable, "-m", "tm4.cli"]


def leftovers(tag: str) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in names.splitlines() if ln.startswith(tag)]


def lab_tag(out: str) -> str:
    line = next(ln for ln in out.splitlines() if "namespaces tm4lab" in ln)
    return line.split("namespaces ", 1)[1].split("{", 1)[0]


def test_lab_runs_green_and_cleans_up() -> None:
    need_root_tools("ip", "nft", "dnsmasq", "svcrack", "sipp")
    t = time.monotonic()
    p = subprocess.run([*TM4, "lab", "--json"], capture_output=True, text=True, timeout=90)
    took = time.monotonic() - t
    out = p.stdout
    print(out[: out.index("[\n")] if "[\n" in out else out)
    steps = json.loads(out[out.index("[\n"):])
    by = {s["name"]: s for s in steps}
    failed = [s for s in steps if s["status"] == "failed"]
    assert not failed, failed
    skipped = [s for s in steps if s["status"] == "skipped" and s["name"] != "asterisk"]
    if IN_CI:
        assert not skipped, skipped  # every component is in the tree: nothing may be skipped
    assert p.returncode == 0, p.stderr
    for name in ("setup", "tm4d", "whitelist", "phone", "guard", "svcrack", "sipp", "phone-ok", "dial-in",
                 "ddns", "drift"):
        assert by[name]["status"] == "ok", by.get(name)
    for attack in ("svcrack", "sipp"):
        f = by[attack]["figures"]
        assert f["threshold_to_ban_ms"] < 500, f  # milliseconds, not seconds
        assert f["packets_after_ban"] == 0, f  # the kernel drops the attacker from the ban on
    assert by["sipp"]["figures"]["phone_ok"] == by["sipp"]["figures"]["phone_registrations"] > 0
    assert "192.0.2.1" in by["dial-in"]["figures"]["said"]  # the caller hears the server's address
    assert by["ddns"]["figures"]["followed_s"] < 15
    assert by["drift"]["figures"]["restored_s"] < 5
    assert not leftovers(lab_tag(out))
    assert took < 60, f"tm4 lab took {took:.1f}s"


def test_lab_cleans_up_on_ctrl_c() -> None:
    need_root_tools("ip", "nft")
    p = subprocess.Popen([*TM4, "lab"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = ""
    assert p.stdout is not None
    end = time.monotonic() + 20
    while time.monotonic() < end:  # wait until tm4d runs, then interrupt in the middle
        line = p.stdout.readline()
        first += line
        if "] tm4d" in line or not line:
            break
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=30)
    out = first + rest
    assert p.returncode == 130, out + err
    assert "interrupted; cleaned up" in err
    assert "cleaning up" in out
    assert not leftovers(lab_tag(out))
    files = out.split("files in ", 1)[1].split()[0]
    ps = subprocess.run(["pgrep", "-f", files], capture_output=True, text=True).stdout.split()
    assert not ps, f"processes of the lab still run: {ps}"
    assert not Path(files).exists()

