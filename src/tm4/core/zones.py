"""Zones: named service profiles (FreePBX's trusted / local / other / internet).

An entry in a zone reaches exactly the zone's services; its stored `services` are the
zone's, re-derived from the config whenever the zone changes (tm4.ops.zones). An
interface can be put in a zone too (`[interfaces] wg0 = "trusted"`), matched by name
(`iifname`), so a tunnel that appears later works without a re-apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tm4.core.errors import ValidationError
from tm4.core.services import ALL, resolve_services

if TYPE_CHECKING:
    from tm4.core.config import Config

# The built-ins, as FreePBX's firewall defines them; [zones.NAME] in the config may
# redefine them or add others.
BUILTIN: dict[str, tuple[str, ...]] = {
    "trusted": (ALL,),
    "local": ("sip-udp", "sip-tcp", "sip-tls", "iax", "http", "https", "ssh", "tftp"),
    "other": ("sip-udp", "sip-tcp", "sip-tls", "iax", "ucp"),
    "internet": (),  # nothing beyond what is public
}


def zone_names(config: Config) -> list[str]:
    return sorted({*BUILTIN, *config.zones})


def zone_services(config: Config, zone: str) -> tuple[str, ...]:
    """The services a zone grants, resolved against the config's catalogue."""
    if zone in config.zones:
        names = list(config.zones[zone].services)
    elif zone in BUILTIN:
        names = [n for n in BUILTIN[zone] if n == ALL or n in config.services]
    else:
        raise ValidationError(f"no zone named {zone!r} (zones: {', '.join(zone_names(config))})")
    return tuple(resolve_services(names, config.services)) if names else ()
