"""tm4 audit: the security checklist of the PBX and of tm4 itself, as a command."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tm4.asterisk.audit import (
    SEVERITIES,
    EntryInfo,
    Finding,
    PasscodeInfo,
    Tm4State,
    at_least,
    audit,
    load_asterisk,
)
from tm4.cli.common import Ctx, echo_json, json_option, pass_ctx
from tm4.core.config import Config
from tm4.core.errors import ValidationError
from tm4.core.model import net_text, parse_time, utcnow
from tm4.core.store import Store
from tm4.dialin import store as dialin_store


def tm4_state(config: Config) -> Tm4State:
    """A snapshot of tm4's config and store; a store that does not exist yet is empty
    (the audit never creates one)."""
    now = utcnow()
    entries: list[EntryInfo] = []
    passcodes: list[PasscodeInfo] = []
    if config.store_path.exists():
        store = Store(config.store_path)
        try:
            for e in store.entries():
                entries.append(EntryInfo(e.name, tuple(e.services), tuple(net_text(n) for n in e.networks()),
                                         e.stale_since is not None, e.is_expired(now)))
            for row in dialin_store.passcodes(store):
                passcodes.append(PasscodeInfo(row["owner"], parse_time(row["created"]) or now,
                                              parse_time(row["last_used"])))
        finally:
            store.close()
    return Tm4State(
        now=now, config_file=config.path.name if config.path else "tm4.toml",
        public_services=tuple(config.firewall.public_services),
        knock_enabled=config.knock.enabled, knock_services=tuple(config.knock.services),
        secret_domain=bool(getattr(getattr(config, "sip_admission", None), "domains", None)),
        safe_mode=config.daemon.safe_mode, rtp=config.rtp_range(), ami_username=config.ami.username,
        entries=entries, passcodes=passcodes,
    )


def _text(f: Finding) -> str:
    where = f"{f.file}:{f.line}" if f.line else f.file
    return f"[{f.severity.upper():6}] {f.id}  {where}\n  {f.title}\n  {f.detail}\n  fix: {f.fix}\n"


@click.command("audit")
@click.option("--asterisk-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Asterisk configuration directory (default: [asterisk] config_dir)")
@click.option("--min-severity", type=click.Choice(SEVERITIES), default="medium", show_default=True,
              help="exit 1 when a finding is at least this severe")
@json_option
@pass_ctx
def audit_cmd(ctx: Ctx, asterisk_dir: Path | None, min_severity: str, as_json: bool) -> None:
    """Check the Asterisk configuration and tm4's own settings for security risks.

    Reads pjsip.conf (with includes and templates), pjsip_wizard.conf, sip.conf, iax.conf,
    manager.conf, extensions.conf, rtp.conf and acl.conf. Secrets are never printed.
    Exit code 1 when a finding reaches --min-severity, so it can run from cron or CI."""
    d = asterisk_dir or Path(ctx.config.asterisk.config_dir)
    if not d.is_dir():
        raise ValidationError(f"{d} is not a directory (give --asterisk-dir)")
    findings = audit(load_asterisk(d), tm4_state(ctx.config))
    if as_json:
        echo_json([f.to_json() for f in findings])
    elif not findings:
        click.echo(f"no findings in {d} and tm4's settings")
    else:
        for f in findings:
            click.echo(_text(f))
        counts = {s: sum(1 for f in findings if f.severity == s) for s in reversed(SEVERITIES)}
        click.echo(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    if at_least(findings, min_severity):
        sys.exit(1)


def register(cli: click.Group) -> None:
    cli.add_command(audit_cmd)
