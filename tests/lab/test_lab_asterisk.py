"""`tm4 lab --asterisk PATH`: the same story against a real Asterisk (TM4_ASTERISK)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import need_root_tools, real_asterisk

TM4 = [sys.executable, "-m", "tm4.cli"]


@pytest.mark.asterisk
def test_lab_drives_a_real_asterisk() -> None:
    binary = real_asterisk()
    need_root_tools("ip", "nft", "dnsmasq", "svcrack", "sipp")
    argv = [*TM4, "lab", "--json", "--asterisk", binary]
    if os.environ.get("TM4_ASTERISK_MODULES"):
        argv += ["--asterisk-modules", os.environ["TM4_ASTERISK_MODULES"]]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=150)
    out = p.stdout
    print(out[: out.index("[\n")] if "[\n" in out else out + p.stderr)
    steps = {s["name"]: s for s in json.loads(out[out.index("[\n"):])}
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert "real Asterisk" in steps["asterisk"]["detail"]
    # what only a real Asterisk shows: its ACL follows tm4, a real call lets the traveller in
    assert steps["acl"]["figures"]["acl_loaded_s"] < 1.0
    assert steps["dial-in"]["figures"]["agi_commands"] >= 5
    assert steps["svcrack"]["figures"]["failures_after_threshold"] == 0
    assert p.returncode == 0

