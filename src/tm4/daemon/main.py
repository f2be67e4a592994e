"""tm4d: the one long-running process that owns the kernel rules — its command line.

`tm4d` runs the daemon (tm4.daemon.host: one asyncio loop, as root) until SIGTERM;
`tm4d --boot` is tm4-boot.service, loading the stored rule set once before the
network; `tm4d --check-config` reads the config and reports. The daemon hosts the
control socket (tm4.daemon.dispatch), the drift repair (tm4.daemon.repair), the
Asterisk ACL sync (tm4.daemon.acl) and the components (tm4.daemon.components): the
AMI guard, the DNS refresher, the FastAGI server and the knock watcher. A component
that is missing or crashes is logged (and a crash restarted with backoff); it never
takes the firewall down.

Stopping tm4d leaves the rules in force (fail closed). SIGHUP reloads the config
(tm4.daemon.reload); a broken file is reported and the running configuration kept.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from tm4.core.config import Config, load_config
from tm4.core.errors import ApplyError, StoreError, Tm4Error
from tm4.core.model import format_time
from tm4.daemon.components import Component
from tm4.daemon.host import Daemon
from tm4.daemon.systemd import setup_logging
from tm4.firewall import coexist
from tm4.ops import safemode
from tm4.ops.engine import Core
from tm4.ops.root import DISABLED_KEY

log = logging.getLogger("tm4.daemon")


def boot_apply(config: Config) -> int:
    """tm4-boot.service: before the network, load the stored rule set (safe mode decided
    first). Never needs DNS or Asterisk."""
    core = Core(config)
    if core.store.get_meta(DISABLED_KEY) is not None:
        log.warning("event=boot_apply_skipped reason=disabled")
        return 0
    # Rows that no longer parse are set aside first; neither they nor a full disk
    # (read-only store) keep the rules from loading.
    quarantined = core.store.quarantine_scan()
    if quarantined:
        log.error("event=store_rows_quarantined count=%d (see `tm4 quarantine list`)", quarantined)
    try:
        active = safemode.evaluate(core).active
    except StoreError as exc:
        active = False
        log.error("event=safe_mode_failed reason=%s", exc)
    try:
        core.apply()
    except ApplyError as exc:
        log.error("event=boot_apply_failed reason=%s", exc)
        return 1
    except StoreError as exc:
        log.warning("event=boot_apply_unrecorded reason=%s", exc)
    n_entries, n_bans = (core.store.rows(f"SELECT count(*) FROM {t}")[0][0] for t in ("entries", "bans"))
    log.info("event=boot_applied safe_mode=%s entries=%d bans=%d", active, n_entries, n_bans)
    return 0


def status_extra(core: Core) -> dict[str, str]:
    """Lines for `tm4 status`: safe mode, tm4d, other firewalls."""
    from tm4.ops.control import daemon_running

    out: dict[str, str] = {}
    until = safemode.until(core.store)
    out["safe mode"] = f"ON until {format_time(until)} (ssh open to all; `tm4 safe-mode off`)" if until else "off"
    out["tm4d"] = "running" if daemon_running(core.config.daemon.socket) else "not running"
    if core.store.get_meta(DISABLED_KEY):
        out["firewall"] = f"DISABLED since {core.store.get_meta(DISABLED_KEY)} (`tm4 enable`)"
    runner = getattr(core.backend, "runner", None)
    if runner is not None:
        out["other firewalls"] = coexist.summary(coexist.detect(runner))
    return out


def check_config(path: str | None) -> int:
    """`tm4d --check-config`: the very reading tm4d and the CLI do, its verdict in one line
    (stdout when valid, stderr with the file and the key when not)."""
    try:
        config = load_config(path, missing_ok=False)
    except Tm4Error as exc:
        print(f"tm4d: {exc}", file=sys.stderr)
        return 1
    print(f"tm4d: config {config.path} is valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tm4d", description="tm4 daemon: owns the kernel rules")
    p.add_argument("--config", default=None, help="config file (default $TM4_CONFIG or /etc/tm4/tm4.toml)")
    p.add_argument("--boot", action="store_true", help="load the stored rule set once and exit (tm4-boot)")
    p.add_argument("--check-config", action="store_true", help="read the config, report, exit")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.check_config:
        return check_config(a.config)
    setup_logging(a.verbose)
    if os.geteuid() != 0 and not a.check_config:
        log.error("event=not_root reason=tm4d must run as root (it owns the kernel rules)")
        return 2
    try:
        config = load_config(a.config)
        if a.boot:
            return boot_apply(config)
        daemon = Daemon(a.config, config=config)
        daemon.lock()
        return asyncio.run(daemon.run())
    except Tm4Error as exc:
        log.error("event=fatal reason=%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Daemon", "Component", "boot_apply", "status_extra", "main"]
