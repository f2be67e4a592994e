"""The daily verbs: add, del, list, show, block, unblock, bans, plan, apply, confirm, status, log."""

from __future__ import annotations

import sys
from datetime import timedelta

import click

from .. import confirm as confirm_mod
from ..core import rules_fingerprint
from ..errors import ValidationError
from ..model import Entry, Origin, format_time
from ..plan import make_plan
from ..services import TM3_MENU
from .common import Ctx, echo_json, json_option, pass_ctx, ttl_option


def _services_or_menu(services: tuple[str, ...]) -> list[str]:
    if services:
        return list(services)
    if not sys.stdin.isatty():
        raise ValidationError("give --service (e.g. --service sip-udp); no terminal to ask on")
    click.echo(TM3_MENU)
    answer = click.prompt("codes", default="1")
    return answer.split()


def _entry_line(e: Entry) -> str:
    exp = format_time(e.expires) or "permanent"
    stale = "  STALE" if e.stale_since else ""
    addrs = ",".join(s.text for s in e.sources)
    return f"{e.name:24} {addrs:36} {','.join(e.services):28} {e.origin!s:8} {exp}{stale}"


def _do_add(ctx: Ctx, name: str, sources: list[str], services: list[str], ttl: timedelta | None,
            note: str, replace: bool, force: bool) -> None:
    e = ctx.core.allow(name, sources, services, ttl=ttl, note=note, origin=Origin.ADMIN,
                       actor=ctx.actor, replace=replace, force=force)
    click.echo(f"allowed {e.name}: {', '.join(s.text for s in e.sources)} -> {', '.join(e.services)}"
               + (f" until {format_time(e.expires)}" if e.expires else ""))


@click.command()
@click.argument("name")
@click.argument("sources", nargs=-1, required=True)
@click.option("--service", "-s", "services", multiple=True, help="service (repeatable; TM3 codes 0-9 too)")
@ttl_option()
@click.option("--note", default="", help="free text kept with the entry")
@click.option("--replace", is_flag=True, help="overwrite an entry with the same name")
@click.option("--force", is_flag=True, help="allow very wide networks and lock-out risks")
@pass_ctx
def add(ctx: Ctx, name: str, sources: tuple[str, ...], services: tuple[str, ...], ttl: timedelta | None,
        note: str, replace: bool, force: bool) -> None:
    """Whitelist NAME: addresses, networks or DNS names, for some services."""
    _do_add(ctx, name, list(sources), _services_or_menu(services), ttl, note, replace, force)


@click.command("del")
@click.argument("name")
@click.option("--force", is_flag=True, help="even if it cuts your own SSH session")
@pass_ctx
def delete(ctx: Ctx, name: str, force: bool) -> None:
    """Remove the entry NAME."""
    if force:
        ctx.core._protect = []
    e = ctx.core.revoke(name, origin=Origin.ADMIN, actor=ctx.actor)
    click.echo(f"removed {e.name}")


@click.command("list")
@json_option
@pass_ctx
def list_(ctx: Ctx, as_json: bool) -> None:
    """List whitelist entries."""
    entries = ctx.core.entries()
    if as_json:
        echo_json([e.to_json() for e in entries])
        return
    if not entries:
        click.echo("no entries")
    for e in entries:
        click.echo(_entry_line(e))


@click.command()
@click.argument("name")
@json_option
@pass_ctx
def show(ctx: Ctx, name: str, as_json: bool) -> None:
    """Show one entry in full."""
    e = ctx.core.get_entry(name)
    if as_json:
        echo_json(e.to_json())
        return
    for k, v in e.to_json().items():
        click.echo(f"{k:10} {', '.join(v) if isinstance(v, list) else v}")


@click.command()
@click.argument("address")
@ttl_option("ban length (default: permanent)")
@click.option("--reason", default="", help="why (shown in `tm4 bans`)")
@click.option("--force", is_flag=True, help="allow wide networks")
@pass_ctx
def block(ctx: Ctx, address: str, ttl: timedelta | None, reason: str, force: bool) -> None:
    """Ban ADDRESS (address or network) in the kernel."""
    b = ctx.core.block(address, ttl=ttl, reason=reason, origin=Origin.ADMIN, actor=ctx.actor, force=force)
    click.echo(f"blocked {b.address}" + (f" until {format_time(b.expires)}" if b.expires else " permanently"))


@click.command()
@click.argument("address")
@pass_ctx
def unblock(ctx: Ctx, address: str) -> None:
    """Lift the ban on ADDRESS."""
    b = ctx.core.unblock(address, origin=Origin.ADMIN, actor=ctx.actor)
    click.echo(f"unblocked {b.address}")


@click.command()
@json_option
@pass_ctx
def bans(ctx: Ctx, as_json: bool) -> None:
    """List banned addresses."""
    items = ctx.core.bans()
    if as_json:
        echo_json([b.to_json() for b in items])
        return
    if not items:
        click.echo("no bans")
    for b in items:
        exp = format_time(b.expires) or "permanent"
        click.echo(f"{b.address:40} {exp:22} x{b.offences:<3} {b.reason}")


def _plan(ctx: Ctx):  # type: ignore[no-untyped-def]
    core = ctx.core
    rs = core.render()
    return rs, make_plan(rs, core.backend, core.store.get_meta("applied_rules"),  # type: ignore[arg-type]
                         rules_fingerprint(rs), core.clock())


@click.command()
@json_option
@pass_ctx
def plan(ctx: Ctx, as_json: bool) -> None:
    """Show what `tm4 apply` would change in the kernel."""
    _, p = _plan(ctx)
    if as_json:
        echo_json(p.to_json())
    else:
        for line in p.lines():
            click.echo(line)


@click.command()
@click.option("--confirm", "confirm_secs", type=int, default=None, metavar="SECONDS",
              help="roll back unless `tm4 confirm` follows within SECONDS")
@click.option("--force", is_flag=True, help="apply even if it would cut your own SSH session")
@pass_ctx
def apply(ctx: Ctx, confirm_secs: int | None, force: bool) -> None:
    """Load the whole rule set into the kernel in one transaction."""
    from ..lockout import check_apply_lockout

    core = ctx.core
    rs = core.render()
    if not force:
        check_apply_lockout(core)
    if confirm_secs is not None:
        confirm_mod.start(core, confirm_secs, ctx.config_path)
    core.apply(rs)
    core.audit("apply", "ruleset", "admin", ctx.actor, confirm=confirm_secs)
    n = sum(len(s.elements) for s in rs.sets.values())
    click.echo(f"applied: {len(rs.sets)} sets, {n} elements, {len(rs.input_rules)} rules")
    if confirm_secs is not None:
        click.echo(f"run `tm4 confirm` within {confirm_secs}s or everything is rolled back")


@click.command()
@pass_ctx
def confirm(ctx: Ctx) -> None:
    """Keep the last `apply --confirm`."""
    confirm_mod.confirm(ctx.core, ctx.actor)
    click.echo("confirmed")


@click.command()
@json_option
@pass_ctx
def status(ctx: Ctx, as_json: bool) -> None:
    """Is the table loaded, what is in it, does it match the store?"""
    from ..status import gather_status

    st = gather_status(ctx.core)
    if as_json:
        echo_json(st)
        return
    click.echo(f"table inet tm4: {'loaded' if st['table_present'] else 'NOT LOADED'}")
    click.echo(f"entries: {st['entries']} ({st['stale']} stale)   bans: {st['bans']}")
    click.echo(f"last apply: {st['last_apply'] or 'never'}")
    click.echo(f"drift: {st['drift'] or 'none'}")
    if st["pending_confirm"]:
        click.echo(f"waiting for `tm4 confirm` (rollback in {st['pending_confirm']}s)")
    for k, v in st.get("extra", {}).items():
        click.echo(f"{k}: {v}")


@click.command()
@click.option("-n", "limit", default=50, show_default=True, help="how many records")
@click.option("--subject", default=None, help="only records about this name or address")
@json_option
@pass_ctx
def log(ctx: Ctx, limit: int, subject: str | None, as_json: bool) -> None:
    """The audit trail: every change, when, how and by whom."""
    recs = ctx.core.store.audit_log(limit, subject)
    if as_json:
        echo_json([r.to_json() for r in recs])
        return
    for r in recs:
        detail = " ".join(f"{k}={v}" for k, v in sorted(r.detail.items()) if v not in (None, "", []))
        click.echo(f"{r.ts} {r.action:9} {r.subject:28} {r.origin:8} {r.actor} {detail}")


@click.command()
@pass_ctx
def sweep(ctx: Ctx) -> None:
    """Forget expired entries and bans (the kernel drops them by itself)."""
    e, b = ctx.core.sweep()
    click.echo(f"expired: {len(e)} entries, {len(b)} bans")


# -- Travelin' Man 3 verbs -------------------------------------------------------

@click.command("add-ip")
@click.argument("name")
@click.argument("ip")
@click.argument("codes", nargs=-1)
@pass_ctx
def add_ip(ctx: Ctx, name: str, ip: str, codes: tuple[str, ...]) -> None:
    """TM3: whitelist IP as NAME with permission codes 0-9."""
    _do_add(ctx, name.lower(), [ip], _services_or_menu(codes), None, "", False, False)


@click.command("add-fqdn")
@click.argument("name")
@click.argument("fqdn")
@click.argument("codes", nargs=-1)
@pass_ctx
def add_fqdn(ctx: Ctx, name: str, fqdn: str, codes: tuple[str, ...]) -> None:
    """TM3: whitelist a DNS name as NAME with permission codes 0-9."""
    from ..model import validate_fqdn

    validate_fqdn(fqdn)
    _do_add(ctx, name.lower(), [fqdn], _services_or_menu(codes), None, "", False, False)


@click.command("del-acct")
@click.argument("name")
@pass_ctx
def del_acct(ctx: Ctx, name: str) -> None:
    """TM3: remove the account NAME."""
    e = ctx.core.revoke(name.lower(), origin=Origin.ADMIN, actor=ctx.actor)
    click.echo(f"removed {e.name}")


def register(cli: click.Group) -> None:
    for cmd in (add, delete, list_, show, block, unblock, bans, plan, apply, confirm, status, log,
                sweep, add_ip, add_fqdn, del_acct):
        cli.add_command(cmd)
