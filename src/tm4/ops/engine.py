"""The operations every way in calls: allow, revoke, block, unblock, apply.

Each change is written to the store and pushed to the kernel in the same step:
the store transaction commits only after the kernel accepted the element
changes, and when the commit fails (a full disk) the kernel change is undone,
so the two never disagree after an error. A writer killed between its kernel
change and its commit leaves a marker; the next writer or apply reconciles.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from tm4.core.config import Config
from tm4.core.errors import (
    ApplyError,
    ConflictError,
    LockoutError,
    NeverSourceError,
    NotFoundError,
    StoreError,
    ValidationError,
)
from tm4.core.model import (
    Ban,
    Entry,
    IPNetwork,
    Origin,
    Source,
    format_time,
    net_text,
    parse_network,
    utcnow,
    validate_endpoint,
    validate_name,
    validate_network,
)
from tm4.core.rules import (
    Element,
    Ruleset,
    SetChanges,
    ban_items,
    diff_elements,
    render_ruleset,
    set_family,
    union_elements,
    whitelist_items,
)
from tm4.core.services import resolve_services
from tm4.core.store import Store
from tm4.core.zones import zone_services
from tm4.firewall import Backend, make_backend

log = logging.getLogger("tm4.core")

Clock = Callable[[], datetime]
# Modules that contribute rule fragments (knock stages, ...): each has
# `ruleset_extra(config, store) -> Ruleset | None`.
RULESET_EXTRA_MODULES = ("tm4.knock.sequence", "tm4.ops.safemode", "tm4.sources.blocklists",
                         "tm4.admission.sip", "tm4.ops.zones")


class Core:
    def __init__(
        self,
        config: Config,
        *,
        backend: Backend | None = None,
        store: Store | None = None,
        clock: Clock = utcnow,
        protect: Sequence[IPNetwork] | None = None,
    ):
        self.config = config
        self.store = store or Store(config.store_path)
        self.backend = backend or make_backend(config.firewall.backend, config.firewall.netns)
        self.clock = clock
        # Addresses that must keep ssh (the admin's own session); None: detect lazily.
        self._protect = protect

    # -- reading ------------------------------------------------------------
    def entries(self) -> list[Entry]:
        return self.store.entries()

    def bans(self) -> list[Ban]:
        return self.store.bans()

    def get_entry(self, name: str) -> Entry:
        e = self.store.get_entry(name)
        if e is None:
            raise NotFoundError(f"no entry named {name!r}")
        return e

    def whitelisted(self, net: IPNetwork) -> list[Entry]:
        """Active entries with a source overlapping `net`."""
        now = self.clock()
        return [e for e in self.store.entries_overlapping(net) if not e.is_expired(now)]

    def audit(self, action: str, subject: str, origin: Origin | str, actor: str, **detail: Any) -> None:
        self.store.audit(action, subject, str(origin), actor, self.clock(), **detail)

    # -- entries ------------------------------------------------------------
    def build_entry(
        self,
        name: str,
        sources: Sequence[str],
        services: Sequence[str],
        *,
        ttl: timedelta | None = None,
        note: str = "",
        origin: Origin = Origin.ADMIN,
        force: bool = False,
        endpoints: Sequence[str] = (),
        zone: str | None = None,
    ) -> Entry:
        validate_name(name)
        if not sources:
            raise ValidationError("give at least one source (address, network or DNS name)")
        parsed: list[Source] = []
        for s in sources:
            src = Source.parse(s, force=force)
            if src not in parsed:
                parsed.append(src)
        now = self.clock()
        if zone and services:
            raise ValidationError("give a zone or services, not both (the zone says the services)")
        return Entry(
            name=name,
            sources=tuple(parsed),
            services=zone_services(self.config, zone) if zone else resolve_services(services, self.config.services),
            origin=origin,
            created=now,
            expires=now + ttl if ttl else None,
            note=note,
            endpoints=tuple(dict.fromkeys(validate_endpoint(x) for x in endpoints)),
            zone=zone or None,
        )

    def allow(
        self,
        name: str,
        sources: Sequence[str],
        services: Sequence[str],
        *,
        ttl: timedelta | None = None,
        note: str = "",
        origin: Origin = Origin.ADMIN,
        actor: str = "",
        replace: bool = False,
        force: bool = False,
        endpoints: Sequence[str] = (),
        zone: str | None = None,
    ) -> Entry:
        entry = self.build_entry(name, sources, services, ttl=ttl, note=note, origin=origin, force=force,
                                 endpoints=endpoints, zone=zone)
        return self.put_entry(entry, replace=replace, actor=actor)

    def put_entry(self, entry: Entry, *, replace: bool = False, actor: str = "") -> Entry:
        """Store an entry and open it in the kernel; bans on its addresses are lifted."""
        with self.store.transaction():
            old = self.store.get_entry(entry.name)
            if old is not None and old.is_expired(self.clock()):
                replace = True  # an expired entry is gone in the kernel; the sweeper just lags
            if old is not None and not replace:
                raise ConflictError(f"an entry named {entry.name!r} exists (use --replace to overwrite it)")
            if old is not None and not entry.resolved:
                entry.resolved = {k: v for k, v in old.resolved.items()
                                  if any(s.fqdn == k for s in entry.sources)}
            if old is not None:
                self._check_lockout(removing=old, adding=entry)
            lifted = [b for n in entry.networks() for b in self.store.bans_overlapping(n)]
            wl = self._wl_change(entry.name, entry, extra=old.networks() if old else [])
            bans = self._ban_change([b.network for b in lifted], remove={b.address for b in lifted})
            self.store.put_entry(entry)
            for b in lifted:
                self.store.delete_ban(b.address)
                self.audit("unblock", b.address, entry.origin, actor, because=f"granted to {entry.name}")
            self.audit(
                "replace" if old else "allow", entry.name, entry.origin, actor,
                sources=[s.text for s in entry.sources], services=list(entry.services),
                expires=format_time(entry.expires), note=entry.note,
                **({"endpoints": list(entry.endpoints)} if entry.endpoints else {}),
            )
            self._push(_merge(wl, bans))
        return entry

    def set_resolved(
        self, name: str, resolved: dict[str, tuple[IPNetwork, ...]], stale_since: datetime | None,
        *, actor: str = "dns", reason: str = "",
    ) -> SetChanges:
        """Replace what an entry's DNS names resolve to; only that entry's elements change."""
        with self.store.transaction():
            old = self.store.get_entry(name)
            if old is None:
                raise NotFoundError(f"no entry named {name!r}")
            new = Entry(old.name, old.sources, old.services, old.origin, old.created, old.expires,
                        old.note, dict(resolved), stale_since, old.endpoints, old.zone)
            ch = self._wl_change(name, new, extra=old.networks())
            self.store.put_entry(new)
            if {k: set(v) for k, v in old.resolved.items()} != {k: set(v) for k, v in resolved.items()}:
                self.audit("resolve", name, old.origin, actor, reason=reason,
                           before={k: [str(n) for n in v] for k, v in old.resolved.items()},
                           after={k: [str(n) for n in v] for k, v in resolved.items()})
            self._push(ch)
        return ch

    def revoke(self, name: str, *, origin: Origin = Origin.ADMIN, actor: str = "") -> Entry:
        with self.store.transaction():
            old = self.store.get_entry(name)
            if old is None:
                raise NotFoundError(f"no entry named {name!r}")
            self._check_lockout(removing=old, adding=None)
            wl = self._wl_change(name, None, extra=old.networks())
            self.store.delete_entry(name)
            self.audit("revoke", name, origin, actor, sources=[s.text for s in old.sources])
            self._push(wl)
        return old

    # -- bans ---------------------------------------------------------------
    def block(
        self,
        address: str,
        *,
        ttl: timedelta | None = None,
        reason: str = "",
        origin: Origin = Origin.ADMIN,
        actor: str = "",
        offences: int | None = None,
        force: bool = False,
    ) -> Ban:
        # A network object (the guard's) gets the very checks a typed address gets.
        net = parse_network(address, force=force) if isinstance(address, str) \
            else validate_network(address, force=force)
        if net.network_address.is_loopback:
            raise ValidationError(f"{address} is loopback; tm4 never bans the server itself")
        with self.store.transaction():
            covering = self.whitelisted(net)
            if covering:
                names = ", ".join(e.name for e in covering[:3])
                raise ConflictError(f"{net_text(net)} is whitelisted ({names}); remove the entry first")
            self._check_ban_lockout(net)
            now = self.clock()
            prev = self.store.get_ban(net_text(net))
            ban = Ban(
                network=net, reason=reason, origin=origin, created=now,
                expires=now + ttl if ttl else None,
                offences=offences if offences is not None else (prev.offences + 1 if prev else 1),
            )
            ch = self._ban_change([net], add=ban)
            self.store.put_ban(ban)
            self.audit("block", ban.address, origin, actor, reason=reason,
                       expires=format_time(ban.expires), offences=ban.offences)
            self._push(ch)
        return ban

    def unblock(self, address: str, *, origin: Origin = Origin.ADMIN, actor: str = "") -> Ban:
        try:
            net = parse_network(address, force=True)
        except NeverSourceError:
            # An older tm4 may have stored such a ban: readers set it aside, never the kernel.
            raise NotFoundError(f"{address.strip()} is not blocked (it can never be a source); a ban an "
                                "older tm4 stored is in `tm4 quarantine list` (`tm4 quarantine drop ID`)") from None
        with self.store.transaction():
            ban = self.store.get_ban(net_text(net))
            if ban is None:
                raise NotFoundError(f"{net_text(net)} is not blocked")
            ch = self._ban_change([net], remove={ban.address})
            self.store.delete_ban(ban.address)
            self.audit("unblock", ban.address, origin, actor)
            self._push(ch)
        return ban

    # -- whole rule set -----------------------------------------------------
    def render(self) -> Ruleset:
        now = self.clock()
        extras: list[Ruleset] = []
        for modname in RULESET_EXTRA_MODULES:
            try:
                module = importlib.import_module(modname)
            except ModuleNotFoundError:
                continue
            extra = module.ruleset_extra(self.config, self.store)
            if extra is not None:
                extras.append(extra)
        return render_ruleset(self.store.set_items(now), self.config, now, extras)

    def apply(self, ruleset: Ruleset | None = None) -> Ruleset:
        """Replace the kernel table in one transaction; on failure the old one stays, whole.

        Runs under the store's write lock, so no writer is between its kernel change and
        its commit; settles what writers killed in that window left (their markers).
        On a full disk (read-only store) the rules are loaded all the same."""
        now = self.clock()
        if self.store.read_only:
            rs = ruleset or self.render()
            self.backend.apply(rs, now)  # type: ignore[call-arg]
            log.warning("event=applied_unrecorded reason=%s", self.store.read_only)
            return rs
        rs = None
        try:
            with self.store.transaction():
                interrupted = self.store.interrupted_kernel_changes()
                rs = ruleset or self.render()
                self.backend.apply(rs, now)  # type: ignore[call-arg]
                self.store.forget_kernel_changes(interrupted)
        except StoreError as exc:
            if rs is not None:
                raise
            # The write lock could not be had (busy for 30 s, broken): the rules load anyway.
            log.warning("event=apply_without_lock reason=%s", exc)
            rs = ruleset or self.render()
            self.backend.apply(rs, now)  # type: ignore[call-arg]
        try:
            self.store.set_meta("last_apply", format_time(now))
            fingerprint = rules_fingerprint(rs)
            if fingerprint != self.store.get_meta("applied_rules") or not self.store.get_meta("applied_listing"):
                # The kernel's own spelling of our rules, for drift checks. Listing costs a dump
                # of every set element, so it is taken only when the rules' shape changed.
                self.store.set_meta("applied_listing", _rules_part(self.backend.listing(terse=True) or ""))  # type: ignore[call-arg]
                self.store.set_meta("applied_rules", fingerprint)
        except StoreError as exc:
            raise StoreError(f"rules applied, but not recorded: {exc}") from None
        return rs

    def sweep(self) -> tuple[list[str], list[str]]:
        """Forget expired entries and bans (the kernel already dropped them by timeout)."""
        now = self.clock()
        gone_e: list[str] = []
        gone_b: list[str] = []
        with self.store.transaction():
            for e in self.store.entries():
                if e.is_expired(now):
                    self.store.delete_entry(e.name)
                    self.audit("expire", e.name, e.origin, "sweeper")
                    gone_e.append(e.name)
            for b in self.store.bans():
                if b.is_expired(now):
                    self.store.delete_ban(b.address)
                    self.audit("expire", b.address, b.origin, "sweeper")
                    gone_b.append(b.address)
        return gone_e, gone_b

    # -- internals ----------------------------------------------------------
    def _closure(self, nets: Iterable[IPNetwork], lookup: Callable[[IPNetwork], list[Any]],
                 key: Callable[[Any], str], nets_of: Callable[[Any], list[IPNetwork]]) -> dict[str, Any]:
        """Everything transitively overlapping `nets`: the clusters a change can touch."""
        found: dict[str, Any] = {}
        frontier = list(nets)
        while frontier:
            for item in lookup(frontier.pop()):
                if key(item) not in found:
                    found[key(item)] = item
                    frontier.extend(nets_of(item))
        return found

    def _wl_change(self, name: str, new: Entry | None, extra: Sequence[IPNetwork] = ()) -> SetChanges:
        nets = list(extra) + (new.networks() if new else [])
        before = self._closure(nets, self.store.entries_overlapping, lambda e: e.name, lambda e: e.networks())
        after = {k: v for k, v in before.items() if k != name}
        if new is not None:
            after[name] = new
        now = self.clock()
        return _diff(whitelist_items(before.values(), now), whitelist_items(after.values(), now))

    def _ban_change(self, nets: Sequence[IPNetwork], add: Ban | None = None,
                    remove: set[str] | None = None) -> SetChanges:
        before = self._closure(nets, self.store.bans_overlapping, lambda b: b.address, lambda b: [b.network])
        after = {k: v for k, v in before.items() if k not in (remove or set())}
        if add is not None:
            after[add.address] = add
        now = self.clock()
        return _diff(ban_items(before.values(), now), ban_items(after.values(), now))

    def _push(self, changes: SetChanges) -> None:
        """Send element changes to the kernel if tm4's table is loaded there.

        Called inside the store transaction: if the kernel refuses, nothing is stored;
        if the transaction then does not commit, the change is undone (Store.on_abort).
        A refused batch (an element timed out meanwhile, drift) falls back to one full
        apply of the new state, which is always exact; so does a marker left by a writer
        killed between its kernel change and its commit.
        """
        if not changes:
            return
        interrupted = self.store.interrupted_kernel_changes()
        self.store.mark_kernel_change()  # refused on a full disk, before the kernel is touched
        if interrupted:
            log.warning("event=reconcile reason=a writer died between its kernel change and its commit "
                        "markers=%s", ",".join(m.name for m in interrupted))
            if self.backend.present():
                self._apply_store_state()
                self.store.on_abort(self._apply_store_state)
            self.store.forget_kernel_changes(interrupted)
            return
        try:
            self.backend.apply_changes(changes, self.clock())  # type: ignore[call-arg]
            self.store.on_abort(lambda: self._undo(changes))
        except ApplyError:
            if not self.backend.present():
                return  # not loaded: the store is the truth, `tm4 apply` loads it
            self._apply_store_state()
            self.store.on_abort(self._apply_store_state)

    def _apply_store_state(self) -> None:
        """One full apply of what the store holds now (inside or after a transaction)."""
        self.backend.apply(self.render(), self.clock())  # type: ignore[call-arg]

    def _undo(self, changes: SetChanges) -> None:
        """The transaction that made `changes` did not commit: take them back out of the
        kernel (the rolled-back store is the truth again)."""
        inverse = SetChanges(delete=changes.add, add=changes.delete, versions=changes.versions)
        try:
            self.backend.apply_changes(inverse, self.clock())  # type: ignore[call-arg]
        except ApplyError:
            self._apply_store_state()
        log.warning("event=kernel_change_undone reason=the store did not commit")

    def protected_sources(self) -> list[IPNetwork]:
        if self._protect is None:
            from tm4.ops.lockout import ssh_client_addresses

            self._protect = [parse_network(a, force=True) for a in ssh_client_addresses()]
        return self._protect

    def _check_lockout(self, removing: Entry, adding: Entry | None) -> None:
        """Refuse an entry change that would stop the admin's SSH client from reaching ssh."""
        if self.config.firewall.public_services and "ssh" in self.config.firewall.public_services:
            return
        for client in self.protected_sources():
            addr = client.network_address
            if not any(addr in n for n in removing.networks() if n.version == addr.version):
                continue
            if not ({"ssh", "all"} & set(removing.services)):
                continue
            others = [e for e in self.whitelisted(client) if e.name != removing.name]
            if adding is not None:
                others.append(adding)
            ok = any(
                {"ssh", "all"} & set(e.services)
                and any(addr in n for n in e.networks() if n.version == addr.version)
                for e in others
            )
            if not ok:
                raise LockoutError(
                    f"this would cut your own SSH session from {addr} off ssh; use --force if you mean it"
                )

    def _check_ban_lockout(self, net: IPNetwork) -> None:
        for client in self.protected_sources():
            if client.version == net.version and client.network_address in net:
                raise LockoutError(
                    f"{net_text(net)} covers your own SSH session from {client.network_address}; refused"
                )


def _diff(before: dict[str, list[tuple[int, int, datetime | None]]],
          after: dict[str, list[tuple[int, int, datetime | None]]]) -> SetChanges:
    old: dict[str, list[Element]] = {k: union_elements(v) for k, v in before.items()}
    new: dict[str, list[Element]] = {k: union_elements(v) for k, v in after.items()}
    versions = {k: set_family(k) for k in set(old) | set(new)}
    return diff_elements(old, new, versions)


def _merge(a: SetChanges, b: SetChanges) -> SetChanges:
    out = SetChanges()
    for ch in (a, b):
        for k, v in ch.delete.items():
            out.delete.setdefault(k, []).extend(v)
        for k, v in ch.add.items():
            out.add.setdefault(k, []).extend(v)
        out.versions.update(ch.versions)
    return out


def rules_fingerprint(rs: Ruleset) -> str:
    """The rendered rules (not set contents), to tell a config change from drift."""
    shape = {
        "input": rs.input_rules,
        "chains": rs.chains,
        "sets": sorted((n, s.flags, s.timeout, s.dynamic) for n, s in rs.sets.items()),
    }
    return json.dumps(shape, sort_keys=True)


def _rules_part(listing: str) -> str:
    """A kernel listing with set elements cut out: what drift detection compares."""
    out: list[str] = []
    skipping = False
    for line in listing.splitlines():
        s = line.strip()
        if s.startswith("elements = {"):
            skipping = not s.endswith("}")
            continue
        if skipping:
            skipping = not s.endswith("}")
            continue
        out.append(re.sub(r"counter packets \d+ bytes \d+", "counter", s))
    return "\n".join(out)


def listing_digest(listing: str) -> str:
    return hashlib.sha256(_rules_part(listing).encode()).hexdigest()
