"""`tm4 refresh [NAME]`: resolve DNS sources now and show what changed."""

from __future__ import annotations

import asyncio

import click

from tm4.asterisk.acl import sync_acl_async
from tm4.cli.common import Ctx, echo_json, json_option, pass_ctx
from tm4.core.model import format_time
from tm4.dns.refresher import NameResult, refresh_now


def register(cli: click.Group) -> None:
    cli.add_command(refresh)


@click.command()
@click.argument("name", required=False)
@json_option
@pass_ctx
def refresh(ctx: Ctx, name: str | None, as_json: bool) -> None:
    """Resolve the DNS names of every entry (or of entry NAME) now.

    A name that fails keeps its last known addresses and shows as stale. When
    the Asterisk ACL is installed it is rewritten and reloaded if addresses changed.
    """
    results = refresh_now(ctx.core, name)
    if any(r.changed for r in results):
        asyncio.run(sync_acl_async(ctx.core))  # when installed: rewrite and reload
    if as_json:
        echo_json([r.to_json() for r in results])
        return
    if not results:
        click.echo("no DNS names in the whitelist")
        return
    for r in results:
        click.echo(describe(r))


def describe(r: NameResult) -> str:
    before = ", ".join(r.before) or "-"
    after = ", ".join(r.after) or "-"
    head = f"{r.entry}  {r.fqdn}  {r.status}"
    if r.status == "changed":
        return f"{head}: {before} -> {after} (ttl {r.ttl}s)"
    if r.status == "unchanged":
        return f"{head}: {after} (ttl {r.ttl}s)"
    stale = f", stale since {format_time(r.stale_since)}" if r.stale_since else ""
    if r.status == "dropped":
        return f"{head}: {r.error}; stale too long, dropped {before}{stale}"
    kept = f"now {after}" if r.changed else f"keeping {after}"
    return f"{head}: {r.error}; {kept}{stale}"
