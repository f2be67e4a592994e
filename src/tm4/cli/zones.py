"""tm4 zones list | sync | trust-public: named service profiles and zoned interfaces."""

from __future__ import annotations

import click

from tm4.cli.common import Ctx, echo_json, json_option, pass_ctx
from tm4.ops import zones as zones_mod


@click.group("zones")
def zones_group() -> None:
    """Zones: trusted, local, other, internet and [zones.NAME]; entries and interfaces in them."""


@zones_group.command("list")
@json_option
@pass_ctx
def list_(ctx: Ctx, as_json: bool) -> None:
    """Each zone's services, member entries and interfaces."""
    ov = zones_mod.overview(ctx.core)
    if as_json:
        echo_json(ov["zones"])
        return
    for z in ov["zones"]:
        svcs = "MISSING" if z["services"] is None else (", ".join(z["services"]) or "nothing beyond public")
        click.echo(f"{z['name']:12} {svcs}")
        if z["members"]:
            click.echo(f"  entries: {', '.join(z['members'])}")
        if z["interfaces"]:
            click.echo(f"  interfaces: {', '.join(z['interfaces'])}")
        if z.get("error"):
            click.echo(f"  {z['error']}")
    for r in ov["refused"]:
        click.echo(f"refused: {r}")


@zones_group.command("sync")
@pass_ctx
def sync(ctx: Ctx) -> None:
    """Give every zone member its zone's services now (tm4d does it when [zones] changes)."""
    changed = zones_mod.reconcile(ctx.core, actor=ctx.actor)
    click.echo(f"updated {len(changed)} entr{'y' if len(changed) == 1 else 'ies'}"
               + (f": {', '.join(changed)}" if changed else ""))


@zones_group.command("trust-public")
@click.argument("iface")
@click.option("--force", is_flag=True, help="yes, trust the interface a default route leaves by")
@click.option("--off", is_flag=True, help="stop trusting it")
@pass_ctx
def trust_public(ctx: Ctx, iface: str, force: bool, off: bool) -> None:
    """Let [interfaces] IFACE = "trusted" hold for the public interface (FreePBX warns about it)."""
    zones_mod.trust_public(ctx.core, iface, force=force, off=off, actor=ctx.actor)
    click.echo(f"{iface}: {'no longer trusted when public' if off else 'trusted even though public'}")


def register(cli: click.Group) -> None:
    cli.add_command(zones_group)
