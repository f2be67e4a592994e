"""`tm4 quarantine`: store rows that no longer parse, set aside instead of breaking tm4.

An older tm4 (or a hand edit) may have stored a ban or entry this version refuses,
such as a ban of a multicast address. Readers move such a row into the quarantine
table and carry on; these verbs show the rows and forget them.
"""

from __future__ import annotations

import json

import click

from tm4.cli.common import Ctx, echo_json, json_option, pass_ctx
from tm4.core.errors import ValidationError


@click.group()
def quarantine() -> None:
    """Store rows that no longer parse, set aside (never fatal)."""


@quarantine.command("list")
@json_option
@pass_ctx
def list_(ctx: Ctx, as_json: bool) -> None:
    """Show the quarantined rows: where they came from, why, and what they held."""
    rows = ctx.call("quarantine", {})
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("quarantine is empty")
    for q in rows:
        click.echo(f"{q['id']:<5} {q['ts']:24} {q['table']:8} {q['key']!r:30} {q['reason']}")
        click.echo(f"      row: {json.dumps(q['row'], sort_keys=True)}")


@quarantine.command("drop")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "drop_all", is_flag=True, help="forget every quarantined row")
@pass_ctx
def drop(ctx: Ctx, ids: tuple[int, ...], drop_all: bool) -> None:
    """Forget quarantined rows by ID (see `tm4 quarantine list`), or --all."""
    if bool(ids) == drop_all:
        raise ValidationError("give the IDs to drop, or --all")
    r = ctx.call("quarantine_drop", {"ids": list(ids)} if ids else {"all": True})
    click.echo(f"dropped {r['dropped']} quarantined row(s)")


def register(cli: click.Group) -> None:
    cli.add_command(quarantine)
