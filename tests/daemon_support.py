"""A real tm4d process for tests: run inside a network namespace, state and socket under tmp."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from netlab import sh

from tm4.core.config import load_config
from tm4.firewall.nft import NftBackend
from tm4.ops import control
from tm4.ops.engine import Core


class Tm4d:
    def __init__(self, tmp: Path, ns: str, toml: str = "", group: str = "tm4test-nogroup",
                 drift_interval: str = "1s"):
        self.tmp = tmp
        self.ns = ns
        # AF_UNIX paths are short (108 bytes): the socket lives in its own short directory.
        self.sockdir = Path(tempfile.mkdtemp(prefix="tm4t", dir="/tmp"))
        os.chmod(self.sockdir, 0o755)
        self.socket = self.sockdir / "tm4.sock"
        self.state = tmp / "state"
        self.config_path = tmp / "tm4.toml"
        self.log_path = tmp / "tm4d.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = (
            f'state_dir = "{self.state}"\n'
            f"[daemon]\n"
            f'socket = "{self.socket}"\n'
            f'fastagi = ""\n'
            f'asterisk_group = "{group}"\n'
            f'drift_interval = "{drift_interval}"\n'
            f"safe_mode = false\n"
        )
        self.write_config(toml)

    def write_config(self, extra: str = "", raw: str | None = None) -> None:
        """`extra` goes after [daemon] (so it may add daemon keys, then other tables)."""
        self.config_path.write_text(raw if raw is not None else self.base + extra)

    @property
    def config(self) -> Any:
        return load_config(self.config_path)

    def core(self) -> Core:
        """A second core on the same store and namespace (as an admin's CLI would have)."""
        cfg = self.config
        return Core(cfg, backend=NftBackend(netns=self.ns), protect=[])

    def start(self, wait: bool = True) -> Tm4d:
        env = dict(os.environ, TM4_NO_SSH_PROTECT="1", PYTHONUNBUFFERED="1")
        log = open(self.log_path, "ab")  # noqa: SIM115 — the child owns it
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "tm4.daemon", "--config",
             str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"tm4d exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(control.DaemonNotRunning):
                if self.call("ping")["pong"]:
                    return
            time.sleep(0.05)
        raise AssertionError(f"tm4d did not answer within {timeout}s:\n{self.log()}")

    def call(self, op: str, **args: Any) -> Any:
        return control.request(self.socket, op, args, timeout=60)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # SIGKILL: no clean-up of any kind
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            for p in self.sockdir.iterdir():
                p.unlink()
            self.sockdir.rmdir()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def nft(self, *args: str, check: bool = True) -> str:
        return sh("ip", "netns", "exec", self.ns, "nft", *args, check=check).stdout

    def nft_script(self, script: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=script, text=True,
                       check=True, capture_output=True)


def wait_until(pred: Any, timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until pred() held, or None if it never did within timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(interval)
    return time.monotonic() - t0 if pred() else None
