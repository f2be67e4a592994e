"""`tm4 apply --confirm N`: roll kernel AND store back unless `tm4 confirm` follows in time.

The rollback runs in a detached process (its own session, no terminal), so it
happens even when the SSH session that started the apply dies with the link.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tm4.core.errors import NotFoundError, Tm4Error
from tm4.firewall.nft import NftBackend
from tm4.ops.engine import Core

PENDING = "confirm.json"


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "confirm.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _pending_path(core: Core) -> Path:
    return core.config.state_dir / PENDING


def pending(core: Core) -> dict[str, Any] | None:
    try:
        return json.loads(_pending_path(core).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def start(core: Core, seconds: int, config_path: str | None) -> dict[str, Any]:
    """Record the rollback point (call BEFORE the apply) and arm the detached timer."""
    if seconds < 5 or seconds > 3600:
        raise Tm4Error("--confirm takes 5 to 3600 seconds")
    with _locked(core.config.state_dir):
        old = pending(core)
        record = {
            "token": secrets.token_hex(8),
            "deadline": time.time() + seconds,
            "store": old["store"] if old else core.store.snapshot(),
            "listing": old["listing"] if old else core.backend.listing(),
        }
        tmp = _pending_path(core).with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.chmod(tmp, 0o600)
        tmp.replace(_pending_path(core))
    argv = [sys.executable, "-m", "tm4.ops.confirm", record["token"]]
    env = dict(os.environ)
    if config_path:
        env["TM4_CONFIG"] = str(config_path)
    subprocess.Popen(
        argv, env=env, start_new_session=True, close_fds=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return record


def confirm(core: Core, actor: str) -> None:
    with _locked(core.config.state_dir):
        if pending(core) is None:
            raise NotFoundError("no apply is waiting for confirmation")
        _pending_path(core).unlink()
        core.audit("confirm", "ruleset", "admin", actor)


def rollback(core: Core, token: str | None = None) -> bool:
    """Restore the store and the kernel table as they were before the unconfirmed apply."""
    with _locked(core.config.state_dir):
        rec = pending(core)
        if rec is None or (token is not None and rec["token"] != token):
            return False
        core.store.restore(rec["store"])
        listing = rec["listing"]
        if not listing:
            core.backend.remove()
        elif isinstance(core.backend, NftBackend):
            # the kernel's own listing, loaded back byte for byte in one transaction
            try:
                core.backend.runner.run("table inet tm4\ndelete table inet tm4\n" + listing)
            except Tm4Error:
                core.apply()
        else:
            core.apply()  # other backends: re-render from the restored store
        _pending_path(core).unlink()
        core.audit("rollback", "ruleset", "admin", "confirm-timer", reason="apply not confirmed in time")
        return True


def _timer(token: str) -> None:
    from tm4.core.config import load_config

    core = Core(load_config(), protect=[])
    rec = pending(core)
    if rec is None or rec["token"] != token:
        return
    time.sleep(max(0.0, rec["deadline"] - time.time()))
    rollback(core, token)


if __name__ == "__main__":
    _timer(sys.argv[1])
