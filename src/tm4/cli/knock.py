"""tm4 knock show | rotate | activate: port-knock credentials and their life cycle."""

from __future__ import annotations

import click

from tm4.cli.common import Ctx, echo_json, json_option, pass_ctx
from tm4.knock import sequence as knock_mod


@click.group("knock")
def knock_group() -> None:
    """Port knocking: the sequence users knock to open their SIP access."""


@knock_group.command("show")
@json_option
@click.option("--host", default="", help="server name or address to put in the examples")
@pass_ctx
def show(ctx: Ctx, as_json: bool, host: str) -> None:
    """Print the knock sequence as a user needs it."""
    seq = knock_mod.current(ctx.config, ctx.core.store)
    assert seq is not None
    if as_json:
        echo_json(knock_mod.credentials(ctx.config, seq))
        return
    click.echo(knock_mod.instructions(ctx.config, seq, host))


@knock_group.command("rotate")
@click.option("--revoke", is_flag=True, help="also end the access of everyone who already knocked")
@json_option
@pass_ctx
def rotate(ctx: Ctx, revoke: bool, as_json: bool) -> None:
    """Pick a new random sequence and put it in force at once (the old one stops working)."""
    seq = knock_mod.rotate(ctx.core, actor=ctx.actor, revoke=revoke)
    if as_json:
        echo_json(knock_mod.credentials(ctx.config, seq))
        return
    click.echo("new knock sequence in force; the old one no longer opens anything\n")
    click.echo(knock_mod.instructions(ctx.config, seq))


@knock_group.command("activate")
@json_option
@pass_ctx
def activate(ctx: Ctx, as_json: bool) -> None:
    """Turn completed knocks into permanent entries now (needs [knock] enabled and activate;
    tm4d then does this by itself every second)."""
    made = knock_mod.activate_knocks(ctx.core)
    if as_json:
        echo_json([e.to_json() for e in made])
        return
    if not ctx.config.knock.activate:
        click.echo("knock.activate is off in the config: nothing to do")
    for e in made:
        click.echo(f"activated {e.name}: {', '.join(s.text for s in e.sources)} -> {', '.join(e.services)}")
    if ctx.config.knock.activate and not made:
        click.echo("no completed knocks waiting")


def register(cli: click.Group) -> None:
    cli.add_command(knock_group)
