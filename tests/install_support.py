"""tm4 installed the way a PBX gets it, and its AGI launcher started the way Asterisk starts
it; shared by tests/install and bench/install_agi_start.py.

- `wheel_venv(base)`: the wheel built by `make dist` from a copy of the checkout (the build
  writes build/ and *.egg-info), pip-installed into a venv made by Debian's python3 (root's
  own interpreter may sit where no other user can reach). tm4's dependencies come from the
  checkout's venv through a .pth line: no registry needed, and tm4 itself can only come
  from the wheel.
- `asterisk_env()`: the environment a classic AGI gets from Asterisk 22 (the real capture).
- `as_asterisk(...)`: the argv that starts a program as Asterisk does: setuid to its user
  and group, `env -i` with that environment, cwd /, exec of the file through its #!.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REAL2 = REPO / "tests" / "fixtures" / "asterisk-22" / "real2"
SYSTEM_PYTHON = "/usr/bin/python3"
CHECKOUT_PARTS = ("pyproject.toml", "Makefile", "agi-bin", "dialplan", "sounds", "systemd", "etc", "src")


@dataclass
class Installed:
    base: Path  # world-readable: Asterisk's user walks through it
    wheel: Path
    venv: Path

    def tm4(self, *args: str, config: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.venv / "bin" / "tm4"), "--config", str(config), *args], cwd="/",
                              capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TM4_NO_SSH_PROTECT": "1"})


def wheel_venv(base: Path) -> Installed:
    src = base / "checkout"
    src.mkdir()
    for name in CHECKOUT_PARTS:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(p, src / name)
    subprocess.run(["make", "-s", "dist", f"PY={sys.executable}"], cwd=src, check=True,
                   capture_output=True, timeout=120)
    (built,) = (src / "dist").glob("tm4-*.whl")
    wheel = base / built.name
    built.rename(wheel)
    shutil.rmtree(src)  # nothing may point into a checkout any more
    venv = base / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-index", "--no-deps", str(wheel)], check=True, timeout=120)
    site = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "tm4-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return Installed(base, wheel, venv)


def asterisk_env() -> dict[str, str]:
    """real2/agi/classic_env.txt's environment; PWD is dash's own addition, not Asterisk's."""
    text = (REAL2 / "agi" / "classic_env.txt").read_text()
    block = text.split("== env (unsorted, as received)\n", 1)[1].split("\n== ", 1)[0]
    env = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
    env.pop("PWD", None)
    assert env["PATH"] and env["AST_AGI_DIR"] == "/var/lib/asterisk/agi-bin", env
    return env


class AsteriskUser:
    """A throw-away non-root user in a throw-away group, like Asterisk's own."""

    def __init__(self, tag: str = "") -> None:
        tag = tag or f"{os.getpid() % 100000}"
        self.group, self.user = f"tm4inst-ast{tag}", f"tm4inst-u{tag}"
        subprocess.run(["groupadd", self.group], check=True)
        subprocess.run(["useradd", "-M", "-N", "-g", self.group, "-s", "/usr/sbin/nologin", self.user],
                       check=True)
        self.uid, self.gid = pwd.getpwnam(self.user).pw_uid, grp.getgrnam(self.group).gr_gid

    def close(self) -> None:
        subprocess.run(["userdel", self.user], check=False, capture_output=True)
        subprocess.run(["groupdel", self.group], check=False, capture_output=True)


def as_asterisk(user: AsteriskUser, program: Path, *args: str) -> list[str]:
    """argv[0] is the script's path and each AGI() argument one more entry, as res_agi does."""
    env = asterisk_env()
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", f"--groups={user.gid}", "--",
            "env", "-i", "-C", "/", *(f"{k}={v}" for k, v in env.items()), str(program), *args]
