"""Blocklists: named lists of addresses and networks to drop, from a file or an HTTP(S) URL.

One interval set per list and family (`bl4n_NAME`, `bl6n_NAME`); their drop rules
come right after the ban rules, ahead of every accept. The whitelist still wins:
whitelisted networks are carved out of the sets when the rule set is rendered, and
each drop rule also skips every whitelist set, so an entry added later is never
dropped either. A list that fails to fetch keeps its last good copy. A list that
would cover the server's own addresses, one of its connected networks (its LAN) or
the admin's SSH client is refused (on `add` and on every refresh).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from tm4.core.config import Config
from tm4.core.durations import parse_duration
from tm4.core.errors import ConflictError, NotFoundError, Tm4Error, ValidationError
from tm4.core.model import IPNetwork, format_time, net_text, parse_time, validate_network
from tm4.core.rules import NftSet, Ruleset, interval, union_elements, wl_set
from tm4.core.store import Store
from tm4.sources import fetch as fetch_mod

if TYPE_CHECKING:
    from tm4.ops.engine import Core

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,19}")
MAX_NETWORKS = 500_000
DEFAULT_REFRESH = "6h"
MIN_REFRESH = timedelta(minutes=5)


def validate_list_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise ValidationError(f"bad blocklist name {name!r}: use 1-20 of a-z 0-9 - starting with a letter or digit")
    return name


def set_name(name: str, version: int) -> str:
    return f"bl{version}n_{name.replace('-', '_')}"


# -- parsing -------------------------------------------------------------------

@dataclass
class Parsed:
    nets: list[IPNetwork]
    skipped: int = 0
    examples: list[str] = field(default_factory=list)  # the first few lines that were not used


def _droppable(net: IPNetwork) -> bool:
    # Never the server itself, nor what cannot be a packet's source.
    a = net.network_address
    return not (a.is_loopback or a.is_link_local or a.is_multicast or a.is_unspecified)


def parse_list(data: bytes) -> Parsed:
    """One address or CIDR per line; `#` and `;` start comments (VoIPBL, Spamhaus DROP,
    plain lists). Lines that are not an address, or that could never be a source or
    are far too wide (/0, IPv4 shorter than /8), are skipped and counted."""
    text = data.decode("utf-8", errors="replace")
    out = Parsed([])
    seen: set[IPNetwork] = set()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        token = line.split()[0]
        try:
            net = validate_network(ipaddress.ip_network(token, strict=False))
            if not _droppable(net):
                raise ValueError(token)
        except (ValueError, Tm4Error):
            out.skipped += 1
            if len(out.examples) < 3:
                out.examples.append(raw.strip()[:80])
            continue
        if net not in seen:
            seen.add(net)
            out.nets.append(net)
            if len(out.nets) > MAX_NETWORKS:
                raise ValidationError(f"the list has more than {MAX_NETWORKS} networks; refused")
    return out


# -- intervals -----------------------------------------------------------------

Interval = tuple[int, int]


def merge(items: Iterable[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for lo, hi in sorted(items):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def subtract(items: Sequence[Interval], holes: Sequence[Interval]) -> list[Interval]:
    """`items` minus `holes` (both merged and sorted)."""
    out: list[Interval] = []
    j = 0
    for lo, hi in items:
        cur = lo
        while j < len(holes) and holes[j][1] < cur:
            j += 1
        k = j
        while k < len(holes) and holes[k][0] <= hi:
            hlo, hhi = holes[k]
            if hlo > cur:
                out.append((cur, hlo - 1))
            cur = max(cur, hhi + 1)
            if cur > hi:
                break
            k += 1
        if cur <= hi:
            out.append((cur, hi))
    return out


def by_family(nets: Iterable[IPNetwork]) -> dict[int, list[Interval]]:
    out: dict[int, list[Interval]] = {4: [], 6: []}
    for n in nets:
        out[n.version].append(interval(n))
    return {v: merge(items) for v, items in out.items()}


# -- the stored lists ----------------------------------------------------------

@dataclass
class Blocklist:
    name: str
    source: str
    refresh: str | None = DEFAULT_REFRESH
    etag: str | None = None
    last_modified: str | None = None
    fetched: datetime | None = None
    nets: list[IPNetwork] = field(default_factory=list)
    error: str | None = None

    def due(self, now: datetime) -> bool:
        if not self.refresh:
            return False
        return self.fetched is None or now - self.fetched >= parse_duration(self.refresh)

    def to_json(self, overlaps: Sequence[str] = ()) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "refresh": self.refresh,
            "fetched": format_time(self.fetched),
            "networks": len(self.nets),
            "etag": self.etag,
            "last_modified": self.last_modified,
            "error": self.error,
            "whitelisted_overlaps": list(overlaps),
        }


def _row(r: Any) -> Blocklist:
    nets: list[IPNetwork] = []
    for t in json.loads(r["nets"] or "[]"):
        try:
            nets.append(ipaddress.ip_network(t))
        except ValueError:
            continue  # a hand-edited store: the rest of the list still counts
    return Blocklist(r["name"], r["source"], r["refresh"], r["etag"], r["last_modified"],
                     parse_time(r["fetched"]), nets, r["error"])


def lists(store: Store) -> list[Blocklist]:
    return [_row(r) for r in store.rows("SELECT * FROM blocklists ORDER BY name")]


def get(store: Store, name: str) -> Blocklist:
    rows = store.rows("SELECT * FROM blocklists WHERE name = ?", (name,))
    if not rows:
        raise NotFoundError(f"no blocklist named {name!r}")
    return _row(rows[0])


def _put(store: Store, bl: Blocklist) -> None:
    with store.transaction() as db:
        db.execute(
            "INSERT OR REPLACE INTO blocklists(name, source, refresh, etag, last_modified, fetched, nets, error)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (bl.name, bl.source, bl.refresh, bl.etag, bl.last_modified, format_time(bl.fetched),
             json.dumps([net_text(n) for n in bl.nets]), bl.error),
        )


# -- what a list must never cover ----------------------------------------------

def interface_networks(netns: str = "") -> list[tuple[IPNetwork, str]]:
    """The server's own addresses (/32, /128) and its connected networks, from `ip addr`."""
    argv = ["ip", *(["-n", netns] if netns else []), "-j", "addr", "show"]
    try:
        out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise Tm4Error(f"cannot read the server's addresses ({' '.join(argv)}): {exc}") from None
    found: list[tuple[IPNetwork, str]] = []
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            try:
                iface = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
            except (KeyError, ValueError):
                continue
            if iface.ip.is_loopback or iface.ip.is_link_local:
                continue
            found.append((ipaddress.ip_network(iface.ip), f"the server's address {iface.ip}"))
            if iface.network.prefixlen < iface.network.max_prefixlen:
                found.append((iface.network, f"the server's network {iface.network} ({link.get('ifname', '?')})"))
    return found


def guarded(core: Core, local: Callable[[], list[tuple[IPNetwork, str]]] | None = None
            ) -> list[tuple[IPNetwork, str]]:
    nets = (local or (lambda: interface_networks(core.config.firewall.netns)))()
    for c in core.protected_sources():
        nets.append((c, f"your SSH client {c.network_address}"))
    return nets


def coverage(nets: Sequence[IPNetwork], guards: Sequence[tuple[IPNetwork, str]]) -> list[str]:
    """Why the list is unsafe: it contains a server address, the admin's SSH client, or a
    whole connected network (a neighbour's address inside the LAN is fine)."""
    why: list[str] = []
    for g, what in guards:
        for n in nets:
            if n.version == g.version and g.subnet_of(n):  # type: ignore[arg-type]
                why.append(f"{net_text(n)} covers {what}")
                break
    return why


def whitelist_overlaps(core: Core, bl: Blocklist) -> list[str]:
    """Entries (with the overlapping list networks) the whitelist carves out of the list."""
    out: list[str] = []
    for n in bl.nets:
        for e in core.whitelisted(n):
            out.append(f"{net_text(n)} ({e.name})")
    return out


# -- operations ----------------------------------------------------------------

@dataclass
class RefreshResult:
    name: str
    changed: bool
    message: str
    error: str | None = None


def _load(bl: Blocklist, core: Core, *, local: Callable[[], list[tuple[IPNetwork, str]]] | None,
          timeout: float, max_bytes: int) -> RefreshResult:
    """Fetch once and, when the answer is new and safe, take it. Never loses the last copy."""
    now = core.clock()
    try:
        got = fetch_mod.fetch(bl.source, etag=bl.etag if bl.nets else None,
                              last_modified=bl.last_modified if bl.nets else None,
                              timeout=timeout, max_bytes=max_bytes)
    except Tm4Error as exc:
        bl.error = str(exc)
        bl.fetched = now  # tried now: wait a whole interval before the next try
        return RefreshResult(bl.name, False, f"kept the last copy ({len(bl.nets)} networks)", bl.error)
    if got.not_modified:
        bl.fetched, bl.error = now, None
        bl.etag, bl.last_modified = got.etag, got.last_modified
        return RefreshResult(bl.name, False, f"not modified ({len(bl.nets)} networks)")
    assert got.body is not None
    try:
        parsed = parse_list(got.body)
        unsafe = coverage(parsed.nets, guarded(core, local))
        if unsafe:
            raise ValidationError("refused, the list would cut the server off: " + "; ".join(unsafe[:5]))
    except Tm4Error as exc:
        bl.error, bl.fetched = str(exc), now
        return RefreshResult(bl.name, False, f"kept the last copy ({len(bl.nets)} networks)", bl.error)
    changed = {*parsed.nets} != {*bl.nets}
    bl.nets, bl.etag, bl.last_modified, bl.fetched = parsed.nets, got.etag, got.last_modified, now
    bl.error = None
    msg = f"{len(parsed.nets)} networks"
    if parsed.skipped:
        msg += f", {parsed.skipped} lines skipped (e.g. {parsed.examples[0]!r})"
    return RefreshResult(bl.name, changed, msg)


def add(core: Core, name: str, source: str, *, refresh: str | None = DEFAULT_REFRESH, actor: str = "",
        local: Callable[[], list[tuple[IPNetwork, str]]] | None = None,
        timeout: float = fetch_mod.DEFAULT_TIMEOUT, max_bytes: int = fetch_mod.DEFAULT_MAX_BYTES,
        apply: bool = True) -> tuple[Blocklist, RefreshResult]:
    """Fetch the list now; store it only if it could be fetched and is safe."""
    validate_list_name(name)
    source = fetch_mod.check_source(source)
    if refresh is not None and parse_duration(refresh) < MIN_REFRESH:
        raise ValidationError(f"refresh {refresh} is too often; at least {MIN_REFRESH.seconds // 60} minutes")
    if core.store.rows("SELECT name FROM blocklists WHERE name = ?", (name,)):
        raise ConflictError(f"a blocklist named {name!r} exists (delete it first)")
    bl = Blocklist(name, source, refresh)
    res = _load(bl, core, local=local, timeout=timeout, max_bytes=max_bytes)
    if res.error:
        raise ValidationError(f"blocklist {name} not added: {res.error}")
    with core.store.transaction():
        _put(core.store, bl)
        core.audit("blocklist-add", name, "admin", actor, source=source, refresh=refresh, networks=len(bl.nets))
    if apply:
        _apply_if_loaded(core)
    return bl, res


def _apply_if_loaded(core: Core) -> None:
    # Like an entry change: when tm4's table is not loaded the store is the truth and
    # `tm4 apply` (or tm4d at boot) loads it.
    if core.backend.present():
        core.apply()


def delete(core: Core, name: str, *, actor: str = "", apply: bool = True) -> Blocklist:
    bl = get(core.store, name)
    with core.store.transaction() as db:
        db.execute("DELETE FROM blocklists WHERE name = ?", (name,))
        core.audit("blocklist-del", name, "admin", actor, source=bl.source)
    if apply:
        _apply_if_loaded(core)
    return bl


def due(core: Core, names: Sequence[str] = (), *, due_only: bool = False) -> list[Blocklist]:
    """The lists to fetch now (reads the store)."""
    chosen = [get(core.store, n) for n in names] if names else lists(core.store)
    now = core.clock()
    return [b for b in chosen if not due_only or b.due(now)]


def load(core: Core, chosen: Sequence[Blocklist], *,
         local: Callable[[], list[tuple[IPNetwork, str]]] | None = None,
         timeout: float = fetch_mod.DEFAULT_TIMEOUT, max_bytes: int = fetch_mod.DEFAULT_MAX_BYTES,
         ) -> list[RefreshResult]:
    """Fetch and check each list, updating the objects; no store access, so tm4d runs it
    in a worker thread while the event loop keeps serving."""
    return [_load(bl, core, local=local, timeout=timeout, max_bytes=max_bytes) for bl in chosen]


def save(core: Core, chosen: Sequence[Blocklist], results: Sequence[RefreshResult], *,
         actor: str = "", apply: bool = True) -> None:
    """Store what `load` brought (a list deleted meanwhile stays deleted); one full apply
    if any list changed."""
    with core.store.transaction():
        for bl, res in zip(chosen, results, strict=True):
            if not core.store.rows("SELECT name FROM blocklists WHERE name = ?", (bl.name,)):
                continue
            _put(core.store, bl)
            if res.changed or res.error:
                core.audit("blocklist-refresh", bl.name, "blocklist", actor or "refresher",
                           networks=len(bl.nets), error=res.error)
    if apply and any(r.changed for r in results):
        _apply_if_loaded(core)


def refresh(core: Core, names: Sequence[str] = (), *, due_only: bool = False, actor: str = "",
            local: Callable[[], list[tuple[IPNetwork, str]]] | None = None,
            timeout: float = fetch_mod.DEFAULT_TIMEOUT, max_bytes: int = fetch_mod.DEFAULT_MAX_BYTES,
            apply: bool = True) -> list[RefreshResult]:
    """Refresh the named lists (all when none): a failed or unsafe answer keeps the last copy."""
    chosen = due(core, names, due_only=due_only)
    results = load(core, chosen, local=local, timeout=timeout, max_bytes=max_bytes)
    save(core, chosen, results, actor=actor, apply=apply)
    return results


# -- rendering -----------------------------------------------------------------

# Parsed intervals per list copy: every render (apply, drift check, status) would
# otherwise parse the stored networks again (0.8 s for 50,000).
_CACHE: dict[tuple[str, str | None, str], dict[int, list[Interval]]] = {}


def _intervals(name: str, fetched: str | None, nets_json: str) -> dict[int, list[Interval]]:
    key = (name, fetched, hashlib.sha256(nets_json.encode()).hexdigest())
    got = _CACHE.get(key)
    if got is None:
        if len(_CACHE) > 64:
            _CACHE.clear()
        nets: list[IPNetwork] = []
        for t in json.loads(nets_json or "[]"):
            try:
                nets.append(ipaddress.ip_network(t))
            except ValueError:
                continue
        got = _CACHE[key] = by_family(nets)
    return got


def ruleset_extra(config: Config, store: Store) -> Ruleset | None:
    """A set per list and family, and its drop rule ahead of every accept."""
    rows = [r for r in store.rows("SELECT name, fetched, nets FROM blocklists ORDER BY name")
            if r["nets"] and r["nets"] != "[]"]
    if not rows:
        return None
    # Carve the whole whitelist out (every entry in the store: an expired one the
    # sweeper has not removed yet only keeps a hole a little longer).
    holes = by_family(n for e in store.entries() for n in e.networks())
    rs = Ruleset()
    for r in rows:
        fams = _intervals(r["name"], r["fetched"], r["nets"])
        for v, ipf in ((4, "ip"), (6, "ip6")):
            name = set_name(r["name"], v)
            items = subtract(fams[v], holes[v])
            rs.sets[name] = NftSet(name, v, tuple(union_elements((lo, hi, None) for lo, hi in items))
                                   if items else ())
            exempt = " ".join(f"{ipf} saddr != @{wl_set(s, v, net)}"
                              for s in sorted(config.services) for net in (False, True))
            rs.early_rules.append(f"{ipf} saddr @{name} {exempt} counter drop")
    return rs
