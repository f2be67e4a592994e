"""Trusted SIP providers: the curated data file, and entries scoped to SIP/IAX made from it.

Travelin' Man 3's enable-trusted-providers opened whole providers to everything;
here each provider is one entry (`provider-NAME`, origin provider) that reaches
only the signalling services the provider uses.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import date, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tm4.core.errors import NotFoundError, Tm4Error, ValidationError
from tm4.core.model import Entry, IPNetwork, Origin, net_text, parse_network, validate_name
from tm4.core.services import SIP_SERVICES

if TYPE_CHECKING:
    from tm4.ops.engine import Core

SIGNALLING = (*SIP_SERVICES, "iax")
ENTRY_PREFIX = "provider-"


@dataclass(frozen=True)
class ProviderNetwork:
    network: IPNetwork
    source: str
    note: str = ""


@dataclass(frozen=True)
class Provider:
    name: str
    title: str
    protocols: tuple[str, ...]
    source: str
    networks: tuple[ProviderNetwork, ...]
    verified: str = ""
    verified_on: date | None = None

    @property
    def entry_name(self) -> str:
        return ENTRY_PREFIX + self.name

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "networks": [net_text(n.network) for n in self.networks],
            "protocols": list(self.protocols),
            "source": self.source,
            "sources": {net_text(n.network): n.source for n in self.networks},
            "network_details": [{"network": net_text(n.network), "source": n.source, "note": n.note}
                                for n in self.networks],
            "verified": self.verified,
            "verified_on": self.verified_on.isoformat() if self.verified_on else None,
        }

    def age_days(self, today: date) -> int | None:
        """Days since the list was last compared with its pages (None: never said)."""
        return (today - self.verified_on).days if self.verified_on else None


@dataclass(frozen=True)
class ProviderList:
    version: int
    providers: tuple[Provider, ...]
    warnings: tuple[str, ...] = ()

    def get(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name.lower():
                return p
        known = ", ".join(p.name for p in self.providers)
        raise NotFoundError(f"no provider named {name!r} in the list (known: {known})")


def _is_url(text: object) -> bool:
    return isinstance(text, str) and text.startswith("https://") and len(text) > len("https://x.y")


def _verified_on(value: object, where: str, name: str) -> date | None:
    # TOML has a date type; a datetime or a string is a mistake, not a day.
    if value is None:
        return None
    if isinstance(value, datetime) or not isinstance(value, date):
        raise ValidationError(f"{where}: {name}: verified_on must be a TOML date like 2026-12-05")
    return value


def parse_providers(data: dict[str, Any], where: str = "providers.toml") -> ProviderList:
    """Check a parsed providers file. Networks without a source page are left out (with a warning)."""
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValidationError(f"{where}: `version` must be a whole number >= 1")
    raw = data.get("provider", [])
    if not isinstance(raw, list):
        raise ValidationError(f"{where}: [[provider]] must be an array of tables")
    providers: list[Provider] = []
    warnings: list[str] = []
    for i, p in enumerate(raw, 1):
        if not isinstance(p, dict):
            raise ValidationError(f"{where}: provider #{i} is not a table")
        name = str(p.get("name", ""))
        try:
            validate_name(name)
        except ValidationError:
            raise ValidationError(f"{where}: provider #{i} has a bad name {name!r}") from None
        if any(q.name == name for q in providers):
            raise ValidationError(f"{where}: provider {name!r} appears twice")
        protocols = p.get("protocols")
        if not isinstance(protocols, list) or not protocols or not set(protocols) <= set(SIGNALLING):
            raise ValidationError(f"{where}: {name}: protocols must be some of {', '.join(SIGNALLING)}")
        source = p.get("source", "")
        if source and not _is_url(source):
            raise ValidationError(f"{where}: {name}: source must be an https:// page")
        nets: list[ProviderNetwork] = []
        for n in p.get("networks", []):
            if not isinstance(n, dict) or "network" not in n:
                raise ValidationError(f"{where}: {name}: each network is {{ network = \"...\", ... }}")
            src = n.get("source", source)
            if not _is_url(src):
                warnings.append(f"{name}: {n['network']} has no source page; left out")
                continue
            try:
                net = parse_network(str(n["network"]))
            except Tm4Error as exc:
                raise ValidationError(f"{where}: {name}: {exc}") from None
            if net.is_loopback or net.is_link_local:
                raise ValidationError(f"{where}: {name}: {net} is loopback or link-local")
            nets.append(ProviderNetwork(net, src, str(n.get("note", ""))))
        if not nets:
            warnings.append(f"{name}: no network with a source; provider left out")
            continue
        providers.append(Provider(name, str(p.get("title", name)), tuple(protocols),
                                  source or nets[0].source, tuple(nets), str(p.get("verified", "")),
                                  _verified_on(p.get("verified_on"), where, name)))
    return ProviderList(version, tuple(providers), tuple(warnings))


def load_providers(path: str | Path | None = None) -> ProviderList:
    """The bundled list (src/tm4/data/providers.toml), or another file in the same format."""
    try:
        if path is None:
            text = resources.files("tm4").joinpath("data/providers.toml").read_text(encoding="utf-8")
            where = "providers.toml"
        else:
            text = Path(path).read_text(encoding="utf-8")
            where = str(path)
    except OSError as exc:
        raise ValidationError(f"cannot read the providers list: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(f"{where} is not valid TOML: {exc}") from None
    return parse_providers(data, where)


def enable(core: Core, plist: ProviderList, names: list[str], *, services: list[str] | None = None,
           actor: str = "") -> list[Entry]:
    """One entry per provider, reaching only its signalling services; re-enabling updates it."""
    chosen = [plist.get(n) for n in names]
    out: list[Entry] = []
    for p in chosen:
        svcs = list(p.protocols)
        if services:
            extra = sorted(set(services) - set(p.protocols))
            if extra:
                raise ValidationError(f"{p.name} does not use {', '.join(extra)} (it uses {', '.join(p.protocols)})")
            svcs = list(services)
        svcs = [s for s in svcs if s in core.config.services]
        if not svcs:
            raise ValidationError(f"none of {p.name}'s services exist in this configuration")
        out.append(core.allow(
            p.entry_name, [net_text(n.network) for n in p.networks], svcs, origin=Origin.PROVIDER,
            actor=actor, replace=True, note=f"{p.title} (tm4 providers list v{plist.version}; {p.source})",
        ))
    return out


def disable(core: Core, names: list[str], *, actor: str = "") -> list[Entry]:
    out: list[Entry] = []
    for n in names:
        e = core.get_entry(ENTRY_PREFIX + n.lower())
        if e.origin != Origin.PROVIDER:
            raise ValidationError(f"{e.name} was not made by `tm4 providers enable`; use `tm4 del`")
        out.append(core.revoke(e.name, origin=Origin.PROVIDER, actor=actor))
    return out
