"""iptables + ipset backend, for hosts without nftables.

tm4 owns the filter-table chain `TM4-INPUT` in both families (jumped to from
position 1 of INPUT) and every ipset named `tm4-*` (iptables_names). The nft
rule strings that `rules.render_ruleset` produces are translated by a small
pure translator (iptables_rule_parser, iptables_translate) into the texts the
tools load (iptables_render); what the kernel holds is read back by
iptables_live. This module is the thin edge that runs the tools.

A full apply builds the temporary sets, renames the ones that are new, loads
the chains with one `iptables-restore -n` per family, then swaps the fresh sets
with the live ones and destroys the old contents. If any step fails, what was
already done is undone: the previous rules and sets stay in force, whole. A
rule the translator cannot express raises TranslateError (an ApplyError) naming
the nft backend, before anything is touched.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import NoReturn

from tm4.core.errors import ApplyError
from tm4.core.rules import Ruleset, SetChanges
from tm4.firewall.iptables_live import (
    LiveChains,
    LiveSet,
    member_json,
    parse_ipset_list,
    parse_save,
    targets_tm4,
)
from tm4.firewall.iptables_names import CHAIN, SET_PREFIX, TEMP_PREFIX, ipset_name, temp_name
from tm4.firewall.iptables_render import (
    SetSpec,
    prefix_intervals,
    render_ipset,
    render_set_changes,
    restore_text,
    set_specs,
)
from tm4.firewall.iptables_rule_parser import TranslateError
from tm4.firewall.iptables_translate import translate

# prefix_intervals: plan.py compares this backend's elements as prefixes.
__all__ = ["IptablesBackend", "TranslateError", "prefix_intervals"]


class IptablesBackend:
    """tm4's rules as iptables chains + ipsets (see the module docstring)."""

    # plan.py: this backend keeps interval elements as prefixes.
    prefix_elements = True

    def __init__(self, netns: str = "", legacy: bool = False):
        self.netns = netns
        v = "-legacy" if legacy else ""
        self.tools = {4: (f"iptables{v}", f"iptables{v}-save", f"iptables{v}-restore"),
                      6: (f"ip6tables{v}", f"ip6tables{v}-save", f"ip6tables{v}-restore")}

    # -- running -----------------------------------------------------------------
    def _run(self, argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        full = list(argv)
        if self.netns:
            full = ["ip", "netns", "exec", self.netns, *full]
        try:
            return subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            pkg = "ipset" if argv[0] == "ipset" else "iptables"
            raise ApplyError(f"{argv[0]} is not installed (Debian package {pkg})") from None
        except subprocess.TimeoutExpired:
            raise ApplyError(f"{argv[0]} did not finish within 120 s") from None

    def _ipset(self, script: str, *, exist: bool = False, what: str = "ipset") -> None:
        if not script.strip():
            return
        p = self._run(["ipset", *(["-exist"] if exist else []), "restore"], script)
        if p.returncode != 0:
            raise ApplyError(f"{what} refused: {_ipset_error(p.stderr, script)}")

    def _restore(self, family: int, text: str) -> None:
        p = self._run([self.tools[family][2], "-n", "-w"], text)
        if p.returncode != 0:
            raise ApplyError(f"{self.tools[family][2]} refused tm4's rules: {_restore_error(p.stderr, text)}")

    def _live_chains(self, family: int) -> LiveChains:
        p = self._run([self.tools[family][1], "-t", "filter"])
        if p.returncode != 0:
            raise ApplyError(f"{self.tools[family][1]} failed: {p.stderr.strip() or p.returncode}")
        return parse_save(p.stdout)

    def _live_sets(self, terse: bool = True, names: Sequence[str] | None = None) -> dict[str, LiveSet]:
        """tm4's ipsets (and leftover temporary ones)."""
        argv = ["ipset", "list", *(["-t"] if terse else [])]
        if names is not None:
            out: dict[str, LiveSet] = {}
            for n in names:
                p = self._run([*argv, n])
                if p.returncode == 0:
                    out.update(parse_ipset_list(p.stdout))
            return out
        p = self._run(argv)
        if p.returncode != 0:
            raise ApplyError(f"ipset list failed: {p.stderr.strip() or p.returncode}")
        return {n: s for n, s in parse_ipset_list(p.stdout).items()
                if n.startswith((SET_PREFIX, TEMP_PREFIX))}

    def _destroy(self, names: Iterable[str]) -> None:
        """Destroy sets, each on its own (one still referenced must not stop the rest)."""
        for n in names:
            self._run(["ipset", "destroy", n])

    # -- the Backend protocol ------------------------------------------------------
    def apply(self, ruleset: Ruleset, now: datetime | None = None) -> None:
        """Sets and both families' chains, all or nothing (see the module docstring)."""
        now = now or datetime.now(UTC)
        wanted = {f: translate(ruleset, f).chains for f in (4, 6)}  # refuses before touching anything
        specs = set_specs(ruleset)
        live_chains = {f: self._live_chains(f) for f in (4, 6)}
        live_sets = self._live_sets()
        self._destroy(n for n in live_sets if n.startswith(TEMP_PREFIX))  # an interrupted apply's
        for spec in specs.values():
            old = live_sets.get(spec.ipset)
            if old is not None and old.signature() != spec.header():
                raise ApplyError(
                    f"ipset {spec.ipset} exists as {old.kind} {old.header.get('family', '')} but tm4 "
                    f"needs {spec.kind} {spec.header()[1]}; run `tm4 disable` (drops tm4's rules and "
                    f"sets), then `tm4 enable`")
        carried = self._carried(ruleset, specs, live_sets)
        suffix = os.urandom(3).hex()
        temps = {n: temp_name(n, suffix) for n in specs}

        def script(op: str, names: Iterable[str]) -> str:
            """`ipset restore` lines `OP TEMP LIVE` (rename / swap) for these sets."""
            return "".join(f"{op} {temps[n]} {specs[n].ipset}\n" for n in names)

        try:
            self._ipset(render_ipset(ruleset, now, suffix, carried), what="ipset (building the new sets)")
        except ApplyError:
            self._destroy(temps.values())
            raise
        new = [n for n, s in specs.items() if s.ipset not in live_sets]
        swaps = [n for n in specs if n not in new]
        new_ipsets = [specs[n].ipset for n in new]
        try:
            self._ipset(script("rename", new))
        except ApplyError:
            self._destroy([*temps.values(), *new_ipsets])
            raise

        def put_back(families: Iterable[int]) -> list[Callable[[], object]]:
            return [functools.partial(self._put_back, f, live_chains[f]) for f in families]

        def drop_new_sets() -> None:
            """The sets built for this apply: temporary ones still unswapped, renamed new ones."""
            self._destroy([*(temps[n] for n in swaps), *new_ipsets])

        done: list[int] = []
        try:
            for f in (4, 6):
                self._restore(f, restore_text(wanted[f], live_chains[f]))
                done.append(f)
        except ApplyError as exc:
            self._undo(exc, [*put_back(done), drop_new_sets])
        try:
            self._ipset(script("swap", swaps), what="ipset (swapping in the new sets)")
        except ApplyError as exc:
            n_done = max(0, _failed_line(str(exc)) - 1)  # the lines before the failing one ran
            back = script("swap", swaps[:n_done])
            self._undo(exc, [lambda: self._ipset(back), *put_back((4, 6)), drop_new_sets])
        # The temporary names now hold the old contents; sets tm4 no longer renders go too.
        keep = {s.ipset for s in specs.values()}
        stale = [n for n in live_sets if n.startswith(SET_PREFIX) and n not in keep]
        self._destroy([*(temps[n] for n in swaps), *stale])

    def _put_back(self, family: int, old: LiveChains) -> None:
        """Load `old` (tm4's chains and INPUT's jumps as they were) over what is there now."""
        self._restore(family, restore_text(old.chains, self._live_chains(family), old.jump_rules()))

    @staticmethod
    def _undo(exc: ApplyError, steps: Sequence[Callable[[], object]]) -> NoReturn:
        """Run every undo step (one failing must not stop the others), then re-raise."""
        problems: list[str] = []
        for step in steps:
            try:
                step()
            except ApplyError as e:
                problems.append(str(e))
        if problems:
            raise ApplyError(f"{exc}; putting the old rules back ALSO failed: {'; '.join(problems)}") from exc
        raise exc

    def _carried(self, rs: Ruleset, specs: Mapping[str, SetSpec],
                 live_sets: Mapping[str, LiveSet]) -> dict[str, list[str]]:
        """Members the kernel put in dynamic sets (clamped sources), with their time left."""
        names = [specs[n].ipset for n, s in rs.sets.items() if s.dynamic and specs[n].ipset in live_sets]
        if not names:
            return {}
        full = self._live_sets(terse=False, names=names)
        out: dict[str, list[str]] = {}
        for n, s in rs.sets.items():
            live = full.get(specs[n].ipset)
            if s.dynamic and live is not None:
                out[n] = list(live.members)
        return out

    def apply_changes(self, changes: SetChanges, now: datetime | None = None) -> None:
        """One `ipset -exist restore` batch: deleting an element the kernel already timed
        out, or re-adding one (its timeout is then reset), is not an error."""
        self._ipset(render_set_changes(changes, now or datetime.now(UTC)), exist=True)

    def present(self) -> bool:
        """Are tm4's chains loaded (both families)?"""
        return all(self._run([self.tools[f][0], "-w", "-S", CHAIN]).returncode == 0 for f in (4, 6))

    def listing(self, terse: bool = False) -> str | None:
        """tm4's chains (iptables-save lines) in both families, then tm4's ipsets; terse:
        without set members. None when neither family has tm4's chain."""
        out: list[str] = []
        found = False
        for f in (4, 6):
            live = self._live_chains(f)
            found = found or CHAIN in live.chains
            out.append(f"# {self.tools[f][0]} filter")
            out += [f"-A INPUT {r}" for r in live.input_rules if targets_tm4(r)]
            for c, rules in sorted(live.chains.items()):
                out.append(f":{c}")
                out += [f"-A {c} {r}" for r in rules]
        if not found:
            return None
        out.append("# ipset")
        for _, s in sorted(self._live_sets(terse=terse).items()):
            if s.name.startswith(SET_PREFIX):
                out += s.listing(members=not terse)
        return "\n".join(out) + "\n"

    def remove(self) -> None:
        """Drop tm4's chains (and INPUT's jumps to them) in both families, then its sets."""
        for f in (4, 6):
            live = self._live_chains(f)
            if live.chains or live.jumps():
                self._restore(f, restore_text({}, live, jumps=()))
        self._destroy(sorted(self._live_sets()))

    def set_elements(self, name: str) -> list[object] | None:
        """The kernel's members of one set, shaped like `nft -j` elements (a string, a
        {"prefix": ...}, or {"elem": {"val": ..., "expires": SECONDS}}); None if missing."""
        p = self._run(["ipset", "list", ipset_name(name)])
        if p.returncode != 0:
            return None
        sets = parse_ipset_list(p.stdout)
        s = sets.get(ipset_name(name))
        return [] if s is None else [member_json(m) for m in s.members]


# -- the tools' error messages ------------------------------------------------------------

def _failed_line(msg: str, pattern: str = r"line (\d+)") -> int:
    """The script line number an error message names (0: none)."""
    m = re.search(pattern, msg)
    return int(m.group(1)) if m else 0


def _cite_line(msg: str, script: str, pattern: str) -> str:
    """`msg`, followed by the script line it names (if it names one)."""
    n = _failed_line(msg, pattern)
    lines = script.splitlines()
    if 0 < n <= len(lines):
        msg += f" [{lines[n - 1]}]"
    return msg


def _ipset_error(stderr: str, script: str) -> str:
    msg = " ".join(ln.strip() for ln in stderr.splitlines() if ln.strip()) or "unknown error"
    return _cite_line(re.sub(r"^ipset v[\d.]+:\s*", "", msg), script, r"line (\d+)")


def _restore_error(stderr: str, text: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Try `")]
    return _cite_line("; ".join(lines) or "unknown error", text, r"line:? (\d+)")
