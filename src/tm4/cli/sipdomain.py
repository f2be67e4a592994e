"""tm4 sip-domain show: what a phone needs to register through a secret SIP domain."""

from __future__ import annotations

import asyncio
import ipaddress

import click

from tm4.admission import phone, sip
from tm4.cli.common import Ctx, echo_json, json_option, pass_ctx
from tm4.core.config import Config
from tm4.dns.lookup import DnsResolver, DnsSettings
from tm4.guard.runtime import own_addresses


@click.group("sip-domain")
def sip_domain_group() -> None:
    """SIP admission by secret domain: a REGISTER to the name admits its source (UDP only)."""


@sip_domain_group.command("show")
@json_option
@click.option("--host", default="", help="the server's name or address phones send to "
              "(default: [dialin] external_address, else the server's first address)")
@pass_ctx
def show(ctx: Ctx, as_json: bool, host: str) -> None:
    """Print each secret domain with the phone settings it needs, and warn when a name
    does not resolve to this server."""
    config = ctx.config
    s = sip.settings(config)
    own = sorted(str(a) for a in own_addresses(config.firewall.netns)
                 if not (a.is_loopback or a.is_link_local))
    if config.dialin.external_address:
        own.append(config.dialin.external_address)
    server = host or config.dialin.external_address or (own[0] if own else "SERVER")
    resolved = asyncio.run(_resolve(config, s.domains)) if s.enabled else {}
    data = phone.phone_settings(config, s, host=_bracketed(server), resolved=resolved, own=own)
    if as_json:
        echo_json(data)
        return
    click.echo(phone.instructions(data))


async def _resolve(config: Config, names: tuple[str, ...]) -> dict[str, phone.Resolution]:
    resolver = DnsResolver(DnsSettings.from_config(config.dns))
    out: dict[str, phone.Resolution] = {}
    for name, res in zip(names, await asyncio.gather(*(resolver.lookup(n) for n in names)), strict=True):
        addrs = tuple(str(n.network_address) for n in (*(res.v4 or ()), *(res.v6 or ())))
        out[name] = phone.Resolution(addrs, "" if addrs else (res.error or "no address"))
    return out


def _bracketed(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def register(cli: click.Group) -> None:
    cli.add_command(sip_domain_group)
