"""What a phone needs to register through a secret SIP domain, and what is wrong with it.

Pure: the caller resolves the names and lists the server's addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta

from tm4.admission.sip import AdmissionSettings
from tm4.core.config import Config
from tm4.core.durations import format_duration


@dataclass(frozen=True)
class Resolution:
    """One name's addresses (strings), or why it has none."""

    addresses: tuple[str, ...] = ()
    error: str = ""


def phone_settings(config: Config, s: AdmissionSettings, *, host: str,
                   resolved: Mapping[str, Resolution], own: Iterable[str]) -> dict[str, object]:
    """`tm4 sip-domain show --json`: per domain, the phone's settings and warnings.

    `host` is the server's address or name the phone sends to (its outbound proxy);
    `own` the server's addresses. A name that does not resolve to one of them is
    warned about: phones then must use the outbound proxy (the name alone will not
    reach the server), and a name pointing at someone else's host is a typo or leak."""
    own_set = {_canonical(a) for a in own}
    svc = config.services[s.services[0]] if s.services else None
    port = svc.ports[0][0] if svc and svc.ports else 5060
    domains = []
    for d in s.domains:
        res = resolved.get(d, Resolution(error="not looked up"))
        here = sorted(a for a in res.addresses if _canonical(a) in own_set)
        warnings = []
        if res.error:
            warnings.append(f"{d} does not resolve ({res.error}): set the outbound proxy to {host}")
        elif not here:
            warnings.append(f"{d} resolves to {', '.join(res.addresses) or 'nothing'}, not to this server "
                            f"({', '.join(sorted(own_set)) or 'addresses unknown'}): "
                            f"set the outbound proxy to {host}")
        domains.append({
            "domain": d,
            "registrar": d,
            "outbound_proxy": f"{host}:{port}" if port != 5060 else host,
            "transport": "UDP",
            "port": port,
            "resolves_to": list(res.addresses),
            "points_here": bool(here),
            "warnings": warnings,
        })
    return {
        "enabled": s.enabled,
        "ttl": format_duration(timedelta(seconds=s.ttl)),
        "services": list(s.services),
        "domains": domains,
    }


def instructions(data: Mapping[str, object]) -> str:
    """The human text of `tm4 sip-domain show`."""
    if not data["enabled"]:
        return ("SIP admission: OFF (set [sip_admission] domains = [\"<secret name>\"], "
                "then `tm4 apply`)")
    lines = [f"SIP admission: on; one REGISTER admits its source for {data['ttl']} "
             f"to {', '.join(data['services'])} (every REGISTER renews it)", ""]  # type: ignore[arg-type]
    for d in data["domains"]:  # type: ignore[attr-defined]
        lines += [
            f"Domain {d['domain']}",
            f"  SIP domain / registrar:  {d['registrar']}",
            f"  Outbound proxy:          {d['outbound_proxy']}",
            f"  Transport:               UDP (port {d['port']}); not TCP, not TLS",
            f"  Resolves to:             {', '.join(d['resolves_to']) or '-'}",
        ]
        lines += [f"  WARNING: {w}" for w in d["warnings"]]
        lines.append("")
    lines.append("The name travels in clear in every REGISTER: treat it like a knock sequence, "
                 "and change it when it may have leaked.")
    return "\n".join(lines)


def _canonical(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address
