"""tm4's Ruleset as the texts the iptables and ipset tools load. Pure.

- `render_iptables(ruleset, family, live)` / `restore_text(chains, live)`:
  iptables-restore -n text loading tm4's chains for one family;
- `render_ipset(ruleset, now, suffix)`: `ipset restore` text building every set
  under a temporary name (`tm4~SUFFIX~NAME`);
- `render_set_changes(changes, now)`: one `ipset -exist restore` batch of
  element changes.

Sets: a hash set (single addresses) becomes `hash:ip`, an interval set
`hash:net` (a range that is not a prefix is cut into prefixes; ipset has no /0,
so 0.0.0.0/0 is two /1). Every set is created with `timeout 0` so elements can
carry their own timeout; ipset caps one at 2147483 s (24.8 days), so a longer
lifetime is loaded with the cap and renewed by the next full apply.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from tm4.core.rules import Element, Ruleset, SetChanges, addr_text
from tm4.firewall.iptables_live import LiveChains
from tm4.firewall.iptables_names import CHAIN, ipset_name, temp_name
from tm4.firewall.iptables_rule_parser import NEEDS_NFT, TranslateError
from tm4.firewall.iptables_translate import translate

MAX_TIMEOUT = 2147483  # ipset's limit for one element's timeout, in seconds
MAXELEM = 1 << 20  # room for 200,000 bans and then some; memory grows with use only
JUMP = ((1, f"-j {CHAIN}"),)  # INPUT's one rule leading to tm4's chain: (position, rule)


# -- iptables-restore text ------------------------------------------------------------

def restore_text(chains: Mapping[str, Sequence[str]], live: LiveChains | None,
                 jumps: Sequence[tuple[int, str]] = JUMP) -> str:
    """iptables-restore -n text turning `live` into `chains`, with INPUT's rules that lead
    to tm4's chains being exactly `jumps` ((position, rule) pairs)."""
    live = live or LiveChains()
    out = ["*filter"]
    out += [f":{c} - [0:0]" for c in chains]  # declaring an existing chain flushes it
    current = live.jump_rules()
    want = sorted(jumps)
    if current != want:
        # by rule, not number: a rule another tool inserts meanwhile cannot shift what goes
        out += [f"-D INPUT {j}" for _, j in reversed(current)]
        out += [f"-I INPUT {p} {j}" for p, j in want]
    stale = [c for c in live.chains if c not in chains]
    out += [f"-F {c}" for c in stale]
    out += [f"-X {c}" for c in stale]
    for c, rules in chains.items():
        out += [f"-A {c} {r}".rstrip() for r in rules]
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_iptables(ruleset: Ruleset, family: int, live: LiveChains | None = None) -> str:
    """iptables-restore (-n) text loading tm4's chains for one family (4 or 6), replacing
    what `live` holds (None: a host without tm4's chains) and keeping one jump from INPUT
    at position 1. Pure."""
    return restore_text(translate(ruleset, family).chains, live)


# -- set elements ---------------------------------------------------------------------

def prefix_intervals(lo: int, hi: int, bits: int) -> list[tuple[int, int]]:
    """[lo, hi] as the fewest CIDR blocks, none wider than /1 (ipset has no /0)."""
    out: list[tuple[int, int]] = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << (bits - 1)
        size = min(size, 1 << (bits - 1))
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, lo + size - 1))
        lo += size
    return out


def element_texts(version: int, lo: int, hi: int) -> list[str]:
    """ipset spellings of one element: a single address, or its prefixes."""
    # addr_text is inet_ntop: 200,000 elements render in a fraction of a second
    if lo == hi:
        return [addr_text(version, lo)]
    bits = 32 if version == 4 else 128
    out: list[str] = []
    for a, b in prefix_intervals(lo, hi, bits):
        plen = bits - (b - a + 1).bit_length() + 1
        text = addr_text(version, a)
        out.append(text if plen == bits else f"{text}/{plen}")
    return out


def _timeout_secs(expires: datetime | None, now: datetime) -> int | None:
    """Seconds left (capped at ipset's limit); None: no timeout; 0: already expired."""
    if expires is None:
        return None
    left = (expires - now).total_seconds()
    if left <= 0:
        return 0
    return min(MAX_TIMEOUT, max(1, math.ceil(left)))


def _element_lines(ipset: str, version: int, elements: Iterable[Element], now: datetime) -> Iterator[str]:
    """`add` lines for elements not yet expired, each with its remaining timeout."""
    tails: dict[datetime | None, str | None] = {None: ""}  # many elements share one expiry
    for e in elements:
        tail = tails.get(e.expires, "?")
        if tail == "?":
            t = _timeout_secs(e.expires, now)
            tail = tails[e.expires] = None if t == 0 else f" timeout {t}"
        if tail is None:  # already over
            continue
        for text in element_texts(version, e.lo, e.hi):
            yield f"add {ipset} {text}{tail}"


# -- ipset restore text ----------------------------------------------------------------

@dataclass(frozen=True)
class SetSpec:
    name: str  # tm4's name (as in the Ruleset)
    ipset: str
    kind: str  # hash:ip / hash:net
    version: int
    timeout: int
    maxelem: int
    netmask: int | None = None

    @property
    def family(self) -> str:
        """ipset's name for the address family."""
        return "inet" if self.version == 4 else "inet6"

    def create_args(self, elements: int = 0) -> str:
        # Pre-size big sets: growing a hash 200,000 elements long costs several rehashes.
        hashsize = 1024
        while hashsize < elements // 2 and hashsize < (1 << 20):
            hashsize <<= 1
        extra = f" netmask {self.netmask}" if self.netmask else ""
        return (f"{self.kind} family {self.family} hashsize {hashsize} maxelem {self.maxelem}"
                f" timeout {self.timeout}{extra}")

    def header(self) -> tuple[str, str]:
        """What a live set's `ipset list -t` must show to be swapped with this one (the
        kernel swaps sets of one type and family; timeout, netmask and size may differ)."""
        return self.kind, self.family


def _seconds(text: str) -> int:
    if not text:
        return 0
    from tm4.core.durations import parse_duration

    return max(0, int(parse_duration(text).total_seconds()))


def set_specs(rs: Ruleset) -> dict[str, SetSpec]:
    """How each set of `rs` is created as an ipset; raises TranslateError for a masked key
    into an interval set."""
    masks: dict[str, int] = {}
    for fam in (4, 6):
        masks.update(translate(rs, fam).masks)
    out: dict[str, SetSpec] = {}
    for name, s in sorted(rs.sets.items()):
        kind = "hash:net" if "interval" in s.flags else "hash:ip"
        mask = masks.get(name)
        if mask is not None and kind != "hash:ip":
            raise TranslateError(f"set {name}: masked keys need a hash:ip set; {NEEDS_NFT}")
        out[name] = SetSpec(name, ipset_name(name), kind, s.version,
                            _seconds(s.timeout) if s.dynamic else 0,
                            s.size or MAXELEM, mask)
    return out


def render_ipset(ruleset: Ruleset, now: datetime, suffix: str,
                 carried: Mapping[str, Sequence[str]] | None = None) -> str:
    """`ipset restore` text creating every set of `ruleset` under its temporary name
    (`temp_name(name, suffix)`), with its elements and their remaining timeouts. `carried`:
    element lines ("ADDR [timeout N]") of dynamic sets, copied from the live ones. Pure."""
    carried = carried or {}
    out: list[str] = []
    for name, spec in set_specs(ruleset).items():
        s = ruleset.sets[name]
        tmp = temp_name(name, suffix)
        out.append(f"create {tmp} {spec.create_args(len(s.elements))}")
        out.extend(_element_lines(tmp, s.version, s.elements, now))
        out.extend(f"add {tmp} {e}" for e in carried.get(name, ()))
    return "\n".join(out) + "\n"


def render_set_changes(changes: SetChanges, now: datetime) -> str:
    """Element changes as one `ipset restore -exist` batch, deletes first (a piece re-cut
    in place is deleted, then added with its new timeout)."""
    out: list[str] = []
    for name, elems in changes.delete.items():
        v = changes.versions[name]
        for e in elems:
            out.extend(f"del {ipset_name(name)} {t}" for t in element_texts(v, e.lo, e.hi))
    for name, elems in changes.add.items():
        out.extend(_element_lines(ipset_name(name), changes.versions[name], elems, now))
    return "\n".join(out) + ("\n" if out else "")
