"""Anti-lockout: the admin's own SSH client is found (even under sudo) and protected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_store import make_core

from tm4.core.config import parse_config
from tm4.core.errors import LockoutError
from tm4.core.model import parse_network
from tm4.ops.engine import Core
from tm4.ops.lockout import check_apply_lockout, decode_proc_addr


def test_client_found_in_an_ancestor_when_sudo_cleared_the_environment() -> None:
    code = "from tm4.ops.lockout import ssh_client_addresses; print(ssh_client_addresses())"
    # outer shell has SSH_CONNECTION (the login shell); the inner process runs with env -i, like sudo
    p = subprocess.run(
        ["env", "SSH_CONNECTION=198.51.100.23 50022 192.0.2.1 22", "TM4_NO_SSH_PROTECT=0",
         "sh", "-c", f"env -i PATH=/usr/bin:/bin {sys.executable} -c '{code}'; true"],
        capture_output=True, text=True, check=True,
    )
    assert p.stdout.strip() == "['198.51.100.23']"


def test_outside_ssh_nothing_is_found() -> None:
    code = "from tm4.ops.lockout import ssh_client_addresses; print(ssh_client_addresses())"
    p = subprocess.run(["env", "-i", sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # the test runner itself may run under ssh; only assert the type of answer
    assert p.stdout.startswith("[")


def test_proc_net_tcp_address_decoding() -> None:
    assert str(decode_proc_addr("0100007F", False)) == "127.0.0.1"
    assert str(decode_proc_addr("B80D0120000000000000000005000000", True)) == "2001:db8::5"


def protected(tmp_path: Path) -> Core:
    core = make_core(tmp_path)
    core._protect = [parse_network("198.51.100.23")]
    return core


def test_removing_the_admins_only_ssh_grant_is_refused(tmp_path: Path) -> None:
    core = protected(tmp_path)
    core.allow("admin", ["198.51.100.0/24"], ["ssh", "sip-udp"])
    with pytest.raises(LockoutError, match="198.51.100.23"):
        core.revoke("admin")
    with pytest.raises(LockoutError):
        core.allow("admin", ["198.51.100.0/24"], ["sip-udp"], replace=True)
    core.allow("admin-home", ["198.51.100.23"], ["all"])
    core.revoke("admin")  # another entry still lets him in


def test_banning_the_admin_is_refused(tmp_path: Path) -> None:
    core = protected(tmp_path)
    with pytest.raises(LockoutError, match="your own SSH session"):
        core.block("198.51.100.0/24")


def test_full_apply_that_shuts_out_ssh_is_refused(tmp_path: Path) -> None:
    core = protected(tmp_path)
    with pytest.raises(LockoutError, match="tm4 add admin-ssh"):
        check_apply_lockout(core)
    core.allow("me", ["198.51.100.23"], ["ssh"])
    check_apply_lockout(core)


def test_public_ssh_needs_no_grant(tmp_path: Path) -> None:
    core = Core(parse_config({"state_dir": str(tmp_path), "firewall": {"public_services": ["ssh"]}}),
                backend=make_core(tmp_path).backend, protect=[parse_network("198.51.100.23")])
    check_apply_lockout(core)
