"""tm4 passcode add|list|del|rotate: the dial-in passcodes (shown once, stored as scrypt hashes)."""

from __future__ import annotations

import sys
from datetime import timedelta

import click

from tm4.cli.common import Ctx, echo_json, json_option, pass_ctx, ttl_option
from tm4.core.durations import format_duration
from tm4.core.errors import NotFoundError, ValidationError
from tm4.core.model import Origin, format_time
from tm4.core.services import resolve_services
from tm4.dialin.passcodes import DEFAULT_DIGITS, MAX_DIGITS, MIN_DIGITS, Passcode, PasscodeBook


def _book(ctx: Ctx) -> PasscodeBook:
    core = ctx.core
    return PasscodeBook.open(core.store, core.config.state_dir, core.clock)


def _services(ctx: Ctx, given: tuple[str, ...]) -> list[str]:
    names = [s.strip() for item in given for s in item.split(",") if s.strip()]
    if names:
        resolve_services(names, ctx.config.services)  # refuses unknown names
    return names


def _read_passcode() -> str:
    line = sys.stdin.readline()
    if not line.strip():
        raise ValidationError("--passcode-stdin: no passcode on standard input")
    return line.strip()


def _show(owner: str, code: str, pc: Passcode, as_json: bool, verb: str) -> None:
    if as_json:
        echo_json({**pc.to_json(), "passcode": code})
        return
    click.echo(f"{verb} passcode for {owner}: {code}")
    click.echo("shown once: tm4 keeps only a hash of it"
               f" (a lost passcode is replaced with `tm4 passcode rotate {owner}`)", err=True)


length_option = click.option(
    "--length", type=click.IntRange(MIN_DIGITS, MAX_DIGITS), default=DEFAULT_DIGITS, show_default=True,
    help="digits of a generated passcode")
stdin_option = click.option(
    "--passcode-stdin", "from_stdin", is_flag=True,
    help=f"read the passcode ({MIN_DIGITS}-{MAX_DIGITS} digits) from standard input instead of generating one")


@click.group("passcode")
def passcode() -> None:
    """Dial-in passcodes: a caller types one, then the address to let in."""


@passcode.command("add")
@click.argument("owner")
@click.option("--services", "--service", "-s", "services", multiple=True,
              help="services the grant opens (repeatable or comma-separated; default: [dialin] grant_services)")
@ttl_option("lifetime of each grant, e.g. 8h (default: [dialin] grant_ttl)")
@click.option("--keep", type=click.IntRange(1, 16), default=1, show_default=True,
              help="how many dial-in addresses OWNER may hold at once (1: a new one replaces the old)")
@click.option("--endpoint", "endpoints", multiple=True, metavar="NAME",
              help="PJSIP endpoint OWNER's grants serve: it follows OWNER's dial-in address (repeatable)")
@length_option
@stdin_option
@json_option
@pass_ctx
def add(ctx: Ctx, owner: str, services: tuple[str, ...], ttl: timedelta | None, keep: int, length: int,
        from_stdin: bool, as_json: bool, endpoints: tuple[str, ...]) -> None:
    """Give OWNER a passcode; its grants are named dialin-OWNER."""
    names = _services(ctx, services)
    book = _book(ctx)
    code = book.add(owner, _read_passcode() if from_stdin else None, services=names,
                    ttl=format_duration(ttl) if ttl else None, keep=keep, length=length,
                    endpoints=endpoints)
    pc = book.get(owner)
    ctx.core.audit("passcode-add", pc.entry_name, Origin.ADMIN, ctx.actor, owner=owner,
                   services=list(pc.services), ttl=pc.ttl, keep=pc.keep, endpoints=list(pc.endpoints))
    _show(owner, code, pc, as_json, "new")


@passcode.command("rotate")
@click.argument("owner")
@length_option
@stdin_option
@json_option
@pass_ctx
def rotate(ctx: Ctx, owner: str, length: int, from_stdin: bool, as_json: bool) -> None:
    """Replace OWNER's passcode; the old one stops working at once."""
    book = _book(ctx)
    code = book.rotate(owner, _read_passcode() if from_stdin else None, length=length)
    pc = book.get(owner)
    ctx.core.audit("passcode-rotate", pc.entry_name, Origin.ADMIN, ctx.actor, owner=owner)
    _show(owner, code, pc, as_json, "new")


@passcode.command("del")
@click.argument("owner")
@click.option("--keep-grant", is_flag=True, help="leave OWNER's current dial-in grant open until it expires")
@pass_ctx
def delete(ctx: Ctx, owner: str, keep_grant: bool) -> None:
    """Delete OWNER's passcode (and, unless --keep-grant, the grant it made)."""
    book = _book(ctx)
    book.delete(owner)
    name = f"dialin-{owner}"
    ctx.core.audit("passcode-del", name, Origin.ADMIN, ctx.actor, owner=owner)
    click.echo(f"deleted the passcode of {owner}")
    if keep_grant:
        return
    try:
        e = ctx.core.get_entry(name)
    except NotFoundError:
        return
    if e.origin == Origin.DIALIN:
        ctx.core.revoke(name, origin=Origin.ADMIN, actor=ctx.actor)
        click.echo(f"revoked {name} ({', '.join(s.text for s in e.sources)})")


@passcode.command("list")
@json_option
@pass_ctx
def list_(ctx: Ctx, as_json: bool) -> None:
    """Owners with a passcode (never the passcodes: tm4 does not have them)."""
    items = _book(ctx).list()
    if as_json:
        echo_json([p.to_json() for p in items])
        return
    if not items:
        click.echo("no passcodes (add one with `tm4 passcode add OWNER`)")
        return
    click.echo(f"{'OWNER':16} {'SERVICES':28} {'TTL':8} {'KEEP':4} {'CREATED':21} LAST USED")
    for p in items:
        click.echo(f"{p.owner:16} {','.join(p.services) or '(default)':28} {p.ttl or '(default)':8} "
                   f"{p.keep:<4} {format_time(p.created) or '':21} {format_time(p.last_used) or 'never'}")


def register(cli: click.Group) -> None:
    cli.add_command(passcode)
