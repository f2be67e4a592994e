"""extensions.conf as a graph: contexts, their extensions, includes and jumps, and
which channel technology/peer each Dial() reaches. Pure."""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

from tm4.asterisk.confparse import ConfFile

_APP = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)
_VAR = re.compile(r"\$\{([A-Za-z0-9_]+)\}")
_JUMPS = {"goto", "gosub", "macro", "gotoif", "gosubif", "dial"}


@dataclass
class Step:
    pattern: str
    app: str  # lower case
    args: str
    where: str


@dataclass
class Context:
    name: str
    where: str
    steps: list[Step] = field(default_factory=list)
    includes: list[tuple[str, str]] = field(default_factory=list)  # (context, where)

    def extensions(self) -> dict[str, list[Step]]:
        out: dict[str, list[Step]] = {}
        for s in self.steps:
            out.setdefault(s.pattern, []).append(s)
        return out


@dataclass
class Dialplan:
    contexts: dict[str, Context] = field(default_factory=dict)
    globals: dict[str, str] = field(default_factory=dict)

    def expand(self, text: str) -> str:
        """${NAME} replaced by a [globals] value (one level; unknown ones kept)."""
        return _VAR.sub(lambda m: self.globals.get(m.group(1), m.group(0)), text)


def _split_args(text: str) -> list[str]:
    """Split at commas outside parentheses/brackets."""
    out, depth, cur = [], 0, ""
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth <= 0:
            out.append(cur)
            cur = ""
            continue
        cur += c
    out.append(cur)
    return [o.strip() for o in out]


def read_dialplan(conf: ConfFile | None) -> Dialplan:
    dp = Dialplan()
    if conf is None:
        return dp
    for sec in conf.sections:
        if sec.is_template:
            continue
        if sec.name == "globals":
            dp.globals.update({o.key.upper(): o.value for o in sec.options})
            continue
        if sec.name == "general":
            continue
        ctx = dp.contexts.setdefault(sec.name, Context(sec.name, sec.where))
        last = ""
        for o in sec.options:
            if o.key == "include":
                ctx.includes.append((o.value.split(",")[0].strip(), o.where))
                continue
            if o.key not in ("exten", "same"):
                continue
            parts = o.value.split(",", 2) if o.key == "exten" else ["", *o.value.split(",", 1)]
            if len(parts) < 3:
                continue
            pattern = parts[0].strip().split("/")[0] if o.key == "exten" else last
            last = pattern
            m = _APP.match(parts[2])
            if not m:
                continue
            ctx.steps.append(Step(pattern, m.group(1).lower(), m.group(2) or "", o.where))
    return dp


def jump_targets(step: Step, current: str) -> list[str]:
    """Contexts a Goto/Gosub/Macro/GotoIf step may continue in (literal names only)."""
    if step.app not in _JUMPS or step.app == "dial":
        return []
    args = step.args
    if step.app in ("gotoif", "gosubif"):
        _, _, branches = args.partition("?")
        targets = [b for b in branches.split(":") if b.strip()]
    else:
        targets = [args]
    out = []
    for t in targets:
        if step.app == "macro":
            name = f"macro-{_split_args(t)[0]}"
        else:
            a = _split_args(t.split("(")[0] if step.app == "gosub" else t)
            name = a[0] if len(a) >= 3 else current
        if name and "$" not in name:
            out.append(name)
    return out


def dial_targets(dp: Dialplan, step: Step) -> list[tuple[str, str]]:
    """(TECH, peer) pairs a Dial() step calls: PJSIP/num@trunk, PJSIP/trunk/num, SIP/trunk/num,
    IAX2/trunk/num, IAX2/user:secret@host/num, DAHDI/g0/num."""
    if step.app != "dial":
        return []
    first = dp.expand(_split_args(step.args)[0]) if step.args else ""
    out: list[tuple[str, str]] = []
    for d in first.split("&"):
        tech, sep, rest = d.strip().partition("/")
        if not sep:
            continue
        tech = tech.upper()
        if tech == "LOCAL":
            continue
        if "@" in rest and tech != "IAX2":
            peer = rest.split("@", 1)[1].split("/")[0]
        elif tech == "IAX2" and "@" in rest.split("/")[0]:
            peer = rest.split("/")[0].split("@", 1)[1]
        else:
            peer = rest.split("/")[0]
        out.append((tech, peer))
    return out


@dataclass(frozen=True)
class Hop:
    context: str
    via: str  # how it was reached: "context=" / "include" / "Goto"
    where: str


def reachable(dp: Dialplan, start: str, start_where: str, start_via: str) -> dict[str, list[Hop]]:
    """Every context reachable from `start`, each with the shortest chain that reaches it."""
    chains: dict[str, list[Hop]] = {start: [Hop(start, start_via, start_where)]}
    todo = deque([start])
    while todo:
        name = todo.popleft()
        ctx = dp.contexts.get(name)
        if ctx is None:
            continue
        nxt = [(inc, "include", w) for inc, w in ctx.includes]
        nxt += [(t, step.app.capitalize(), step.where) for step in ctx.steps for t in jump_targets(step, name)]
        for target, via, where in nxt:
            if target not in chains:
                chains[target] = [*chains[name], Hop(target, via, where)]
                todo.append(target)
    return chains


def chain_text(chain: list[Hop]) -> str:
    parts = []
    for i, h in enumerate(chain):
        parts.append(f"[{h.context}]" if i == 0 else f"{h.via} [{h.context}] ({h.where})")
    return " -> ".join(parts)


_PATTERN_CHARS = set("XZN[.!")


def literal_prefix(pattern: str) -> str:
    """The fixed digits a pattern starts with: `_9011.` -> '9011', `_X.` -> ''."""
    if not pattern.startswith("_"):
        return pattern
    out = ""
    for c in pattern[1:]:
        if c.upper() in _PATTERN_CHARS:
            break
        out += c
    return out


def is_wildcard(pattern: str) -> bool:
    """Open-ended with no fixed prefix: `_X.`, `_.`, `_!`, `_NX.` -- any number goes out."""
    return pattern.startswith("_") and pattern.endswith((".", "!")) and literal_prefix(pattern) == ""


def is_international(pattern: str) -> bool:
    """Reaches numbers abroad: starts with 011, 00 or + (optionally after an outside-line 9)."""
    p = literal_prefix(pattern)
    if p.startswith("9") and len(p) > 1 and p[1] in "0+":
        p = p[1:]
    return p.startswith(("011", "00", "+"))
