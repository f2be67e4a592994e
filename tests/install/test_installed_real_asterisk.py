"""The wheel-installed tm4 under a real Asterisk 22 (marked `asterisk`: runs when TM4_ASTERISK
names an Asterisk binary, the one kind of test that may skip in CI).

`tm4 install` lays out the launcher, prompts and dialplan; Asterisk runs as its own non-root
user with those files; FastAGI is down (nothing listens where the dialplan points), so the
shipped context falls back to classic AGI: Asterisk itself execs the launcher, which
completes the dial-in against tm4d. The caller is a Local channel typing with SendDTMF(),
as in the real capture (real2/agi/dialin_fastagi_real.txt).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need_root_tools
from daemon_support import Tm4d, wait_until
from dialin_support import add_passcode
from install_support import REAL2, SYSTEM_PYTHON, AsteriskUser, Installed, wheel_venv
from netlab import Lab

pytestmark = pytest.mark.asterisk
ASTERISK = os.environ.get("TM4_ASTERISK", "")
CORE_SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")  # Debian's asterisk-core-sounds-en-gsm
CODE = "48213977"
MODULES = ("pbx_config", "res_agi", "app_senddtmf", "func_callerid", "func_channel", "func_timeout",
           "format_gsm", "format_wav", "format_pcm", "codec_gsm", "codec_ulaw", "res_speech",
           "res_clioriginate")


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    if not ASTERISK:
        pytest.skip("TM4_ASTERISK does not name an Asterisk binary")
    need_root_tools("make", "setpriv", "useradd")
    if not CORE_SOUNDS.is_dir() or not Path(SYSTEM_PYTHON).exists():
        pytest.fail("needs Debian's asterisk-core-sounds-en-gsm (digits, letters) and python3-venv")
    base = Path(tempfile.mkdtemp(prefix="tm4ast", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield wheel_venv(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def asterisk_tree(root: Path, user: AsteriskUser, moddir: str) -> Path:
    """Asterisk's own configuration: its directories are the ones `tm4 install --root` filled."""
    etc = root / "etc/asterisk"
    dirs = {"astetcdir": etc, "astdatadir": root / "var/lib/asterisk", "astvarlibdir": root / "var/lib/asterisk",
            "astdbdir": root / "var/lib/asterisk", "astkeydir": root / "var/lib/asterisk",
            "astagidir": root / "var/lib/asterisk/agi-bin", "astspooldir": root / "var/spool/asterisk",
            "astrundir": root / "var/run/asterisk", "astlogdir": root / "var/log/asterisk", "astmoddir": Path(moddir)}
    for key, d in dirs.items():
        if key != "astmoddir":
            d.mkdir(parents=True, exist_ok=True)
    for d in ("var/spool/asterisk", "var/run/asterisk", "var/log/asterisk", "var/lib/asterisk"):
        os.chown(root / d, user.uid, user.gid)
    for sub in ("digits", "letters"):
        (root / "var/lib/asterisk/sounds/en" / sub).symlink_to(CORE_SOUNDS / sub)
    # Asterisk's XML documentation from its build (without it stasis refuses to start)
    prefix = Path(ASTERISK).resolve().parent.parent
    docs = next((d / "documentation" for d in (prefix / "var/lib/asterisk", Path("/var/lib/asterisk"))
                 if (d / "documentation" / "core-en_US.xml").is_file()), None)
    assert docs is not None, f"no documentation/core-en_US.xml beside {ASTERISK}"
    (root / "var/lib/asterisk/documentation").symlink_to(docs)
    conf = etc / "asterisk.conf"
    conf.write_text("[directories]\n" + "".join(f"{k} => {v}\n" for k, v in dirs.items())
                    + "[options]\nverbose = 3\n")
    (etc / "modules.conf").write_text("[modules]\nautoload = no\n" + "".join(f"load => {m}.so\n" for m in MODULES))
    (etc / "logger.conf").write_text("[general]\n[logfiles]\nfull => notice,warning,error,verbose,dtmf\n")
    # The caller half types like the capture's harness: passcode, address, then the confirm key.
    (etc / "extensions.conf").write_text(
        "[general]\nstatic = yes\n\n#include extensions_tm4.conf\n\n"
        "[tm4-caller]\n"
        "exten => s,1,Answer()\n"
        " same => n,Wait(2)\n"
        f" same => n,SendDTMF({CODE}#)\n"
        " same => n,Wait(1)\n"
        " same => n,SendDTMF(203*0*113*7#)\n"
        " same => n,Wait(16)\n"
        " same => n,SendDTMF(1)\n"
        " same => n,Wait(40)\n"
        " same => n,Hangup()\n")
    return conf


def test_fastagi_down_the_dialplan_falls_back_to_the_installed_launcher(
        installed: Installed, lab: Lab, tmp_path: Path) -> None:
    user = AsteriskUser("r")
    d = Tm4d(tmp_path, lab.pbx.ns, group=user.group)
    d.write_config('[dialin]\nexternal_address = "192.0.2.1"\n')
    root = installed.base / "root"
    proc: subprocess.Popen[bytes] | None = None
    try:
        d.start()
        add_passcode(d.core(), "alice", CODE)
        # tm4.toml for the install: the same socket; FastAGI where nothing listens
        cfg = tmp_path / "install.toml"
        cfg.write_text(d.config_path.read_text().replace('fastagi = ""', f'fastagi = "127.0.0.1:{free_port()}"'))
        r = installed.tm4("install", "--root", str(root), "--asterisk", str(REAL2 / "etc/asterisk.conf"),
                          "--no-enable", config=cfg)
        assert r.returncode == 0, r.stdout + r.stderr
        moddir = os.environ.get("TM4_ASTERISK_MODULES") or str(Path(ASTERISK).resolve().parent.parent
                                                                / "lib/asterisk/modules")
        conf = asterisk_tree(root, user, moddir)
        log = root / "var/log/asterisk/full"
        console = tmp_path / "console.out"
        with console.open("wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", lab.pbx.ns, ASTERISK, "-f", "-C", str(conf),
                                     "-U", user.user, "-G", user.group],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd="/", env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                                                  "LANG": "C.UTF-8"})

        def rx(command: str) -> str:
            return subprocess.run([ASTERISK, "-C", str(conf), "-rx", command], capture_output=True,
                                  text=True, timeout=15).stdout

        started = wait_until(lambda: "Asterisk" in rx("core show version"), 20)
        assert started is not None, repr(rx("core show version")) + console.read_text(errors="replace")[-1500:]
        assert wait_until(lambda: "tm4-dialin" in rx("dialplan show tm4-dialin"), 10) is not None
        said = rx("channel originate Local/s@tm4-caller extension s@tm4-dialin")
        granted = wait_until(lambda: d.core().store.get_entry("dialin-alice") is not None, 60, 0.2)
        full = log.read_text(errors="replace") if log.exists() else ""
        assert granted is not None, said + full[-6000:]
        assert [s.text for s in d.core().store.get_entry("dialin-alice").sources] == ["203.0.113.7"]
        assert "203.0.113.7" in d.nft("list", "ruleset")
        # the fallback, as Asterisk logged it: FastAGI refused, then the launcher from astagidir
        assert "AGI(\"Local/s@tm4-caller" in full and "agi://127.0.0.1:" in full
        assert '"1?classic,1")' in full, full[-6000:]  # AGISTATUS was FAILURE: the GotoIf took the fallback
        assert f"Launched AGI Script {root}/var/lib/asterisk/agi-bin/tm4-dialin.agi" in full, full[-6000:]
    finally:
        if proc is not None:
            subprocess.run([ASTERISK, "-C", str(root / "etc/asterisk/asterisk.conf"), "-rx", "core stop now"],
                           capture_output=True, timeout=15)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        d.close()
        user.close()
