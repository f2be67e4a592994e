"""`tm4 asterisk ...`: Asterisk's own named ACL kept in step with the whitelist."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from tm4.asterisk.acl import (
    acl_status,
    render_acl,
    sync_acl_async,
)
from tm4.asterisk.install import install_async
from tm4.asterisk.ties import (
    tied_endpoints,
)
from tm4.cli.common import Ctx, echo_json, json_option, pass_ctx
from tm4.core.config import config_path


def register(cli: click.Group) -> None:
    cli.add_command(asterisk)


@click.group()
def asterisk() -> None:
    """Asterisk's named ACL [tm4] and tm4's AMI user."""


@asterisk.command()
@click.option("--asterisk", "asterisk_conf", default=None, metavar="PATH",
              help="Asterisk's asterisk.conf or its directory (astetcdir is read from it; "
                   "default: [asterisk] config_dir)")
@click.option("--endpoint-acl", "endpoint_acls", multiple=True, metavar="ENDPOINT",
              help="tie this PJSIP endpoint to its own ACL tm4-ENDPOINT (repeatable; default: ask per endpoint)")
@click.option("--all-endpoint-acls", is_flag=True, help="tie every endpoint offered, without asking")
@json_option
@pass_ctx
def install(ctx: Ctx, asterisk_conf: str | None, endpoint_acls: tuple[str, ...], all_endpoint_acls: bool,
            as_json: bool) -> None:
    """Write acl_tm4.conf, #include it from acl.conf, create tm4's AMI user; offer each
    PJSIP phone an entry names (--endpoint) its own ACL."""
    from tm4.asterisk.dirs import asterisk_dirs

    toml = ctx.config.path or config_path(ctx.config_path)
    dirs = asterisk_dirs(asterisk_conf) if asterisk_conf else None
    report = asyncio.run(install_async(ctx.core, toml, dirs=dirs,
                                       endpoint_acls=_endpoint_chooser(endpoint_acls, all_endpoint_acls)))
    if as_json:
        echo_json(report.to_json())
    else:
        click.echo("\n".join(report.lines()))


@asterisk.command()
@json_option
@pass_ctx
def status(ctx: Ctx, as_json: bool) -> None:
    """Is the include there, is the file current, what does Asterisk have loaded?"""
    st = asyncio.run(acl_status(ctx.core))
    if as_json:
        echo_json(st.to_json())
    else:
        yn = {True: "yes", False: "NO", None: "unknown"}
        click.echo(f"ACL file:        {st.path} ({'current' if st.current else 'NOT current' if st.exists else 'missing'})")
        inc = yn[st.include] + (f" ({st.include_error})" if st.include_error else "")
        click.echo(f"acl.conf include: {inc}")
        click.echo(f"reload pending:  {'yes' if st.pending else 'no'}")
        click.echo(f"AMI:             {st.ami}")
        if st.asterisk_current is not None:
            click.echo(f"Asterisk's ACL:  {'same as rendered' if st.asterisk_current else 'DIFFERS'}")
        if st.asterisk_note:
            click.echo(f"note:            {st.asterisk_note}")
        if st.asterisk_rules is not None and not st.asterisk_current:
            click.echo("rendered:  " + "; ".join(st.rendered_rules))
            click.echo("Asterisk:  " + "; ".join(st.asterisk_rules))
        for ep in st.endpoints:
            loaded = {True: "same as rendered", False: "DIFFERS", None: "unknown"}[ep["asterisk_current"]]
            click.echo(f"endpoint {ep['endpoint']}:   acl={ep['acl']} {'tied' if ep['tied'] else 'NOT tied'};"
                       f" Asterisk: {loaded}; rendered: {'; '.join(ep['rendered_rules'])}")
        if st.dangling_warning:
            click.echo(f"WARNING:         {st.dangling_warning}")
    if not st.ok:
        ctx_exit(1)


@asterisk.command()
@pass_ctx
def render(ctx: Ctx) -> None:
    """Print the ACL file tm4 would write (changes nothing)."""
    click.echo(render_acl(ctx.core.entries(), ctx.core.clock(), tied=tied_endpoints(ctx.config)), nl=False)


@asterisk.command()
@json_option
@pass_ctx
def sync(ctx: Ctx, as_json: bool) -> None:
    """Rewrite the ACL if the whitelist changed it and reload it over AMI."""
    res = asyncio.run(sync_acl_async(ctx.core))
    if as_json:
        echo_json(res.to_json())
        return
    if res.untied:
        click.echo(f"untied endpoint(s) {', '.join(res.untied)}: pjsip.conf no longer defines them before "
                   "tm4's #include (Asterisk would ignore those ties)")
    if not res.installed:
        click.echo("the ACL is not installed (run `tm4 asterisk install`)")
        return
    click.echo(("written" if res.changed else "already current")
               + ("; reloaded" if res.reloaded else "")
               + (f"; reload pending ({res.error})" if res.pending else ""))


def _endpoint_chooser(named: tuple[str, ...], everything: bool) -> Any:
    """Which offered endpoints to tie: those named, all, or (on a terminal) asked one by one;
    None (no terminal, nothing named) keeps the ties as they are."""
    import sys

    if named:
        return lambda offered: list(named)
    if everything:
        return lambda offered: [c.endpoint for c in offered]
    if not sys.stdin.isatty():
        return None

    def ask(offered: list[Any]) -> list[str]:
        return [c.endpoint for c in offered
                if click.confirm(f"endpoint {c.endpoint}: register only from the addresses of the entries "
                                 f"that serve it (acl=tm4-{c.endpoint})?", default=True)]
    return ask


def ctx_exit(code: int) -> None:
    click.get_current_context().exit(code)
