"""The daily verbs: add, del, list, show, block, unblock, bans, plan, apply, confirm, status, log."""

from __future__ import annotations

import sys
from typing import Any

import click

from tm4.cli.common import Ctx, echo_json, echo_line, json_option, pass_ctx, ttl_option
from tm4.core.errors import ValidationError
from tm4.core.services import TM3_MENU
from tm4.firewall.plan import make_plan
from tm4.ops import confirm as confirm_mod
from tm4.ops.engine import rules_fingerprint


def _services_or_menu(services: tuple[str, ...]) -> list[str]:
    if services:
        return list(services)
    if not sys.stdin.isatty():
        raise ValidationError("give --service (e.g. --service sip-udp); no terminal to ask on")
    click.echo(TM3_MENU)
    answer = click.prompt("codes", default="1")
    return answer.split()


def _entry_line(e: dict[str, Any]) -> str:
    exp = e["expires"] or "permanent"
    stale = "  STALE" if e.get("stale") else ""
    svcs = f"zone {e['zone']}" if e.get("zone") else ",".join(e["services"])
    return f"{e['name']:24} {','.join(e['sources']):36} {svcs:28} {e['origin']:8} {exp}{stale}"


def _do_add(ctx: Ctx, name: str, sources: list[str], services: list[str], ttl: str | None,
            note: str, replace: bool, force: bool, endpoints: list[str] | None = None,
            zone: str | None = None) -> None:
    e = ctx.call("allow", {"name": name, "sources": sources, "services": services, "ttl": ttl,
                           "note": note, "replace": replace, "force": force,
                           **({"endpoints": endpoints} if endpoints else {}), **({"zone": zone} if zone else {})})
    zone_text = f"zone {e['zone']}: " if e.get("zone") else ""
    click.echo(f"allowed {e['name']}: {', '.join(e['sources'])} -> {zone_text}{', '.join(e['services']) or 'nothing'}"
               + (f" until {e['expires']}" if e["expires"] else ""))


@click.command()
@click.argument("name")
@click.argument("sources", nargs=-1, required=True)
@click.option("--service", "-s", "services", multiple=True, help="service (repeatable; TM3 codes 0-9 too)")
@ttl_option(as_text=True)
@click.option("--note", default="", help="free text kept with the entry")
@click.option("--replace", is_flag=True, help="overwrite an entry with the same name")
@click.option("--force", is_flag=True, help="allow very wide networks and lock-out risks")
@click.option("--endpoint", "endpoints", multiple=True, metavar="NAME",
              help="PJSIP endpoint this entry serves: only its sources may register as it (repeatable)")
@click.option("--zone", default=None, metavar="ZONE",
              help="instead of --service: the zone's services (trusted, local, other, internet, [zones.NAME])")
@pass_ctx
def add(ctx: Ctx, name: str, sources: tuple[str, ...], services: tuple[str, ...], ttl: str | None,
        note: str, replace: bool, force: bool, endpoints: tuple[str, ...], zone: str | None) -> None:
    """Whitelist NAME: addresses, networks or DNS names, for some services or a zone."""
    _do_add(ctx, name, list(sources), list(services) if zone else _services_or_menu(services), ttl, note,
            replace, force, list(endpoints), zone)


@click.command("del")
@click.argument("name")
@click.option("--force", is_flag=True, help="even if it cuts your own SSH session")
@pass_ctx
def delete(ctx: Ctx, name: str, force: bool) -> None:
    """Remove the entry NAME."""
    e = ctx.call("revoke", {"name": name, "force": force})
    click.echo(f"removed {e['name']}")


@click.command("list")
@json_option
@pass_ctx
def list_(ctx: Ctx, as_json: bool) -> None:
    """List whitelist entries."""
    entries = ctx.call("entries", {})
    if as_json:
        echo_json(entries)
        return
    if not entries:
        click.echo("no entries")
    for e in entries:
        echo_line(_entry_line(e))


@click.command()
@click.argument("name")
@json_option
@pass_ctx
def show(ctx: Ctx, name: str, as_json: bool) -> None:
    """Show one entry in full."""
    e = ctx.call("entry", {"name": name})
    if as_json:
        echo_json(e)
        return
    for k, v in e.items():
        echo_line(f"{k:10} {', '.join(v) if isinstance(v, list) else v}")


@click.command()
@click.argument("address")
@ttl_option("ban length (default: permanent)", as_text=True)
@click.option("--reason", default="", help="why (shown in `tm4 bans`)")
@click.option("--force", is_flag=True, help="allow wide networks")
@pass_ctx
def block(ctx: Ctx, address: str, ttl: str | None, reason: str, force: bool) -> None:
    """Ban ADDRESS (address or network) in the kernel."""
    b = ctx.call("block", {"address": address, "ttl": ttl, "reason": reason, "force": force})
    click.echo(f"blocked {b['address']}" + (f" until {b['expires']}" if b["expires"] else " permanently"))


@click.command()
@click.argument("address")
@pass_ctx
def unblock(ctx: Ctx, address: str) -> None:
    """Lift the ban on ADDRESS."""
    b = ctx.call("unblock", {"address": address})
    click.echo(f"unblocked {b['address']}")


@click.command()
@json_option
@pass_ctx
def bans(ctx: Ctx, as_json: bool) -> None:
    """List banned addresses."""
    items = ctx.call("bans", {})
    _mention_quarantine(ctx)
    if as_json:
        echo_json(items)
        return
    if not items:
        click.echo("no bans")
    for b in items:
        exp = b["expires"] or "permanent"
        echo_line(f"{b['address']:40} {exp:22} x{b['offences']:<3} {b['reason']}")


def _mention_quarantine(ctx: Ctx) -> int:
    """Rows the store set aside because they no longer parse: said on stderr (the
    output itself keeps its shape)."""
    n = len(ctx.call("quarantine", {"scan": False}))
    if n:
        click.echo(f"tm4: {n} store row(s) no longer parse and were set aside: `tm4 quarantine list`",
                   err=True)
    return n


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
    from tm4.ops.lockout import check_apply_lockout

    core = ctx.core
    rs = core.render()
    if not force:
        check_apply_lockout(core)
    if confirm_secs is not None:
        # local even when tm4d runs: the rollback snapshot and timer belong to this apply
        confirm_mod.start(core, confirm_secs, ctx.config_path)
        core.apply(rs)
        core.audit("apply", "ruleset", "admin", ctx.actor, confirm=confirm_secs)
    else:
        ctx.call("apply", {"force": force})
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
    from tm4.daemon.status import gather_status

    st = gather_status(ctx.core)
    st["quarantined"] = len(ctx.core.store.quarantined())
    if st["quarantined"]:
        st["extra"]["quarantine"] = (f"{st['quarantined']} row(s) no longer parse, set aside "
                                     "(`tm4 quarantine list`)")
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
    args: dict[str, Any] = {"limit": limit}
    if subject:
        args["subject"] = subject
    recs = ctx.call("log", args)
    if as_json:
        echo_json(recs)
        return
    for r in recs:
        detail = " ".join(f"{k}={v}" for k, v in sorted(r["detail"].items()) if v not in (None, "", []))
        echo_line(f"{r['ts']} {r['action']:9} {r['subject']:28} {r['origin']:8} {r['actor']} {detail}")


@click.command()
@pass_ctx
def sweep(ctx: Ctx) -> None:
    """Forget expired entries and bans (the kernel drops them by itself)."""
    r = ctx.call("sweep", {})
    click.echo(f"expired: {len(r['entries'])} entries, {len(r['bans'])} bans")


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
    from tm4.core.model import validate_fqdn

    validate_fqdn(fqdn)
    _do_add(ctx, name.lower(), [fqdn], _services_or_menu(codes), None, "", False, False)


@click.command("del-acct")
@click.argument("name")
@pass_ctx
def del_acct(ctx: Ctx, name: str) -> None:
    """TM3: remove the account NAME."""
    e = ctx.call("revoke", {"name": name.lower()})
    click.echo(f"removed {e['name']}")


def register(cli: click.Group) -> None:
    for cmd in (add, delete, list_, show, block, unblock, bans, plan, apply, confirm, status, log,
                sweep, add_ip, add_fqdn, del_acct):
        cli.add_command(cmd)
