"""Zones in the store and the kernel: members follow their zone; interfaces in zones.

A zone member's stored services are its zone's. When a zone's services change in
the config, `reconcile` rewrites every member in one store transaction and loads
the result in one kernel transaction; a zone still in use cannot disappear (the
members keep their services and the reconcile is refused, naming them).

`[interfaces] wg0 = "trusted"` becomes `iifname "wg0" accept` (a zone with some
services: one `iifname ... dport ... accept` per service), so an interface that
appears later, like a tunnel, works without a re-apply. The public interface (the
one a default route leaves by) is never trusted unless the admin forced it with
`tm4 zones trust-public IFACE --force`.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tm4.core.config import Config
from tm4.core.errors import ConfigError, ValidationError
from tm4.core.model import Entry
from tm4.core.rules import Ruleset, port_match
from tm4.core.services import ALL
from tm4.core.store import Store
from tm4.core.zones import zone_names, zone_services

if TYPE_CHECKING:
    from tm4.ops.engine import Core

log = logging.getLogger("tm4.zones")
TRUST_PUBLIC_KEY = "zones_trust_public"  # store meta: interfaces the admin forced trusted


def members(entries: list[Entry]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in entries:
        if e.zone:
            out.setdefault(e.zone, []).append(e.name)
    return out


def check_in_use(config: Config, entries: list[Entry]) -> None:
    """A zone entries still use must stay defined."""
    known = set(zone_names(config))
    gone = {z: names for z, names in members(entries).items() if z not in known}
    if gone:
        parts = [f"{z!r} (used by {', '.join(sorted(n)[:5])})" for z, n in sorted(gone.items())]
        raise ConfigError("zone " + "; ".join(parts) + " is in use and cannot be deleted: define it again in "
                          "[zones], or move its entries to another zone first (`tm4 add NAME ... --zone Z --replace`)")


def reconcile(core: Core, *, actor: str = "zones") -> list[str]:
    """Give every member its zone's current services; one store transaction, one full apply."""
    entries = core.entries()
    check_in_use(core.config, entries)
    changed: list[str] = []
    with core.store.transaction():
        for e in entries:
            if not e.zone:
                continue
            want = zone_services(core.config, e.zone)
            if tuple(e.services) != want:
                core.store.put_entry(replace(e, services=want))
                core.audit("zone", e.name, e.origin, actor, zone=e.zone, before=list(e.services),
                           after=list(want))
                changed.append(e.name)
        if changed and core.backend.present():
            core.apply()  # inside the transaction: a refused apply stores nothing either
    return changed


# -- interfaces ----------------------------------------------------------------------

def public_interfaces(netns: str = "") -> set[str]:
    """The interfaces a default route leaves by (IPv4 or IPv6)."""
    found: set[str] = set()
    for fam in ("-4", "-6"):
        argv = ["ip", *(["-n", netns] if netns else []), "-j", fam, "route", "show", "default"]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout
            found.update(str(r["dev"]) for r in json.loads(out or "[]") if r.get("dev"))
        except (OSError, subprocess.SubprocessError, ValueError, TypeError, AttributeError):
            continue
    return found


def forced(store: Store) -> set[str]:
    return set((store.get_meta(TRUST_PUBLIC_KEY) or "").split())


def interface_rules(config: Config, public: set[str], forced_ifaces: set[str]) -> tuple[list[str], list[str]]:
    """Pure: the accept rules of the [interfaces] table, and what was refused."""
    rules: list[str] = []
    refused: list[str] = []
    for iface, zone in sorted(config.interfaces.items()):
        svcs = zone_services(config, zone)
        if ALL in svcs:
            if iface in public and iface not in forced_ifaces:
                refused.append(f"{iface} is the public interface: not trusted "
                               f"(`tm4 zones trust-public {iface} --force` if you mean it)")
                continue
            rules.append(f'iifname "{iface}" accept')
            continue
        rules.extend(f'iifname "{iface}" {port_match(config.services[s])} accept' for s in svcs)
    return rules, refused


def ruleset_extra(config: Config, store: Store) -> Ruleset | None:
    if not config.interfaces:
        return None
    needs_public = any(ALL in zone_services(config, z) for z in config.interfaces.values())
    public = public_interfaces(config.firewall.netns) if needs_public else set()
    rules, refused = interface_rules(config, public, forced(store))
    for r in refused:
        log.warning("event=interface_not_trusted reason=%r", r)
    rs = Ruleset()
    rs.input_rules.extend(rules)
    return rs


def trust_public(core: Core, iface: str, *, force: bool, off: bool = False, actor: str = "") -> set[str]:
    """Allow (or stop allowing) the public interface `iface` to be trusted."""
    now = forced(core.store)
    if off:
        now.discard(iface)
    else:
        if not force:
            raise ValidationError(f"making {iface} trusted opens every port to the whole internet if it is "
                                  "the public interface; add --force if you mean it")
        now.add(iface)
    with core.store.transaction():
        core.store.set_meta(TRUST_PUBLIC_KEY, " ".join(sorted(now)) or None)
        core.audit("trust-public-off" if off else "trust-public", iface, "admin", actor)
    if core.backend.present():
        core.apply()
    return now


def overview(core: Core) -> dict[str, Any]:
    cfg = core.config
    mem = members(core.entries())
    needs_public = any(ALL in zone_services(cfg, z) for z in cfg.interfaces.values() if z in zone_names(cfg))
    public = public_interfaces(cfg.firewall.netns) if needs_public else set()
    _, refused = interface_rules(cfg, public, forced(core.store))
    zones = []
    for z in zone_names(cfg):
        zones.append({"name": z, "services": list(zone_services(cfg, z)), "members": sorted(mem.get(z, [])),
                      "interfaces": sorted(i for i, zz in cfg.interfaces.items() if zz == z)})
    for z in sorted(set(mem) - set(zone_names(cfg))):
        zones.append({"name": z, "services": None, "members": sorted(mem[z]), "interfaces": [],
                      "error": "not defined any more; its members keep their services"})
    return {"zones": zones, "refused": refused, "trust_public": sorted(forced(core.store))}
