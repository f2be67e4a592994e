"""tm4 as a PBX gets it: a wheel built by `make dist`, pip-installed into a fresh venv outside
the checkout, `tm4 install --root`, the installed AGI launcher started exactly as Asterisk
starts it (exec through its #!, cwd /, `env -i` with Asterisk's environment from the real
capture, as a non-root user in the Asterisk group) completing a dial-in against a running
tm4d, then `tm4 uninstall --root` leaving nothing behind.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from agisim import Caller, Channel, Line, run_stdio
from conftest import need_root_tools
from daemon_support import Tm4d
from dialin_support import add_passcode
from install_support import (
    REAL2,
    REPO,
    SYSTEM_PYTHON,
    AsteriskUser,
    Installed,
    as_asterisk,
    wheel_venv,
)
from netlab import Lab

CODE = "48213977"
FIRST_COMMAND_MS = 150.0
# What the wheel must carry, and where each lives in the checkout (its one copy).
SHIPPED = {"agi-bin/tm4-dialin.agi": "agi-bin/tm4-dialin.agi",
           "dialplan/extensions_tm4.conf": "dialplan/extensions_tm4.conf",
           "systemd/tm4d.service": "systemd/tm4d.service",
           "systemd/tm4-boot.service": "systemd/tm4-boot.service",
           "tm4.toml.example": "etc/tm4.toml.example"}


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    need_root_tools("make", "setpriv", "useradd")
    if not Path(SYSTEM_PYTHON).exists():
        pytest.fail("Debian's python3 is missing (package python3-venv)")
    base = Path(tempfile.mkdtemp(prefix="tm4inst", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield wheel_venv(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_wheel_carries_what_a_pbx_needs(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as z:
        names = set(z.namelist())
        for inside, in_repo in SHIPPED.items():
            assert z.read(f"tm4/data/pbx/{inside}") == (REPO / in_repo).read_bytes(), inside
        prompts = sorted(p.name for p in (REPO / "sounds" / "en").iterdir())
        assert prompts and all(f"tm4/data/pbx/sounds/en/{n}" in names for n in prompts)
        assert "tm4/data/providers.toml" in names
    # tm4 in the venv is the wheel's, not the checkout's
    out = subprocess.run([str(installed.venv / "bin" / "python"), "-I", "-c",
                          "import tm4, sys; print(tm4.__file__); print(sys.path)"],
                         capture_output=True, text=True, check=True, cwd="/").stdout
    assert out.startswith(str(installed.venv)), out
    assert str(REPO / "src") not in out


@pytest.fixture
def asterisk_user() -> Iterator[AsteriskUser]:
    u = AsteriskUser()
    try:
        yield u
    finally:
        u.close()


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def test_installed_launcher_completes_a_dial_in_as_asterisk_starts_it(
        installed: Installed, asterisk_user: AsteriskUser, lab: Lab, tmp_path: Path) -> None:
    d = Tm4d(tmp_path, lab.pbx.ns, group=asterisk_user.group)
    d.write_config('[dialin]\nexternal_address = "192.0.2.1"\n')
    root = installed.base / "root"
    try:
        d.start()
        add_passcode(d.core(), "alice", CODE)
        r = installed.tm4("install", "--root", str(root), "--asterisk", str(REAL2 / "etc" / "asterisk.conf"),
                          config=d.config_path)
        assert r.returncode == 0, r.stdout + r.stderr
        launcher = root / "var/lib/asterisk/agi-bin/tm4-dialin.agi"
        assert launcher.read_text().splitlines()[0] == f"#!{installed.venv}/bin/python -I"
        assert f'SOCKET = "{d.socket}"' in launcher.read_text()
        assert oct(launcher.stat().st_mode & 0o777) == "0o755"
        dialplan = (root / "etc/asterisk/extensions_tm4.conf").read_text()
        assert f"AGI(tm4-dialin.agi,{d.socket})" in dialplan and "/run/tm4/tm4.sock" not in dialplan
        unit = (root / "etc/systemd/system/tm4d.service").read_text()
        assert f"ExecStart={installed.venv}/bin/tm4d --config {d.config_path}" in unit
        prompts = root / "var/lib/asterisk/sounds/en/tm4"
        assert sorted(p.name for p in prompts.iterdir()) == sorted(p.name for p in (REPO / "sounds/en").iterdir())

        # Asterisk: exec of the file (its #!), cwd /, Asterisk's environment and nothing else,
        # as its own non-root user; argv[0] the script's path, then the AGI() arguments.
        argv = as_asterisk(asterisk_user, launcher, str(d.socket))
        ch = Channel(Line(), Caller(keys=[CODE + "#", "203*0*113*7#", "1"]), args=[str(d.socket)],
                     sounds=prompts)
        run = run_stdio(argv, ch, env={}, timeout=30)
        assert run.returncode == 0, run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        assert ch.commands[0] == "ANSWER"
        assert ch.missing == [], f"prompts not installed: {ch.missing}"
        assert ch.commands[-1].startswith('VERBOSE "tm4 dial-in: granted'), ch.commands
        assert ch.said == ["203.0.113.7", "192.0.2.1"]
        assert [s.text for s in d.core().store.get_entry("dialin-alice").sources] == ["203.0.113.7"]
        assert "203.0.113.7" in d.nft("list", "ruleset")
        assert run.first_command_s is not None
        first_ms = run.first_command_s * 1000
        print(f"installed launcher: first AGI command {first_ms:.1f} ms after exec")
        assert first_ms <= FIRST_COMMAND_MS, f"first AGI command after {first_ms:.1f} ms"
    finally:
        d.close()

    r = installed.tm4("uninstall", "--root", str(root), config=d.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _files_under(root) == [] and list(root.iterdir()) == [], r.stdout
