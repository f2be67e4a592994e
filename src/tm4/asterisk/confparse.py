"""Read Asterisk .conf files as Asterisk does: sections, templates, #include, comments.

Read-only and forgiving: whatever cannot be read becomes a note, never an
exception, so one broken include does not hide the rest. `#exec` is never run.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path

MAX_DEPTH = 10
_SECTION = re.compile(r"\[([^\]]+)\]\s*(?:\(([^)]*)\))?\s*$")
_INCLUDE = re.compile(r"#\s*(include|tryinclude|exec)\s+(.+)$", re.IGNORECASE)


@dataclass
class Option:
    key: str
    value: str
    where: str  # file:line


@dataclass
class Section:
    name: str
    where: str
    is_template: bool = False
    templates: tuple[str, ...] = ()
    options: list[Option] = field(default_factory=list)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The last value of `key` (Asterisk: a later line overrides)."""
        found = [o.value for o in self.options if o.key == key]
        return found[-1] if found else default

    def get_all(self, key: str) -> list[Option]:
        return [o for o in self.options if o.key == key]

    @property
    def type(self) -> str:
        return (self.get("type") or "").strip().lower()


@dataclass
class ConfFile:
    sections: list[Section]
    notes: list[str]

    def of_type(self, kind: str) -> list[Section]:
        return [s for s in self.sections if not s.is_template and s.type == kind]


def _strip_comment(line: str, in_block: bool) -> tuple[str, bool]:
    """Remove ; comments (\\; is a literal ;) and ;-- block --; comments."""
    out: list[str] = []
    i = 0
    while i < len(line):
        if in_block:
            end = line.find("--;", i)
            if end < 0:
                return "".join(out), True
            i = end + 3
            in_block = False
            continue
        c = line[i]
        if c == "\\" and line[i + 1:i + 2] == ";":
            out.append(";")
            i += 2
            continue
        if c == ";":
            if line[i:i + 3] == ";--":
                in_block = True
                i += 3
                continue
            break
        out.append(c)
        i += 1
    return "".join(out), in_block


def read_conf(path: str | Path, config_dir: str | Path | None = None, *,
              confine: bool = False) -> ConfFile:
    """Parse one config file and everything it includes; templates are applied.

    `confine`: an include that resolves outside `config_dir` is refused (a note
    saying so), never read -- what an audit of someone else's files needs."""
    p = Path(path)
    base = Path(config_dir) if config_dir else p.parent
    sections: list[Section] = []
    notes: list[str] = []
    if not p.is_file():
        notes.append(f"{p.name}: not found")
        return ConfFile(sections, notes)
    _read(p, base, sections, notes, [], None, base.resolve() if confine else None)
    _apply_templates(sections, notes)
    return ConfFile(sections, notes)


def _read(path: Path, base: Path, sections: list[Section], notes: list[str], stack: list[Path],
          current: Section | None, root: Path | None = None) -> Section | None:
    """Read one file into `sections`; an included file continues the includer's current
    section (as Asterisk does), so this returns the section that is current at its end."""
    real = path.resolve()
    if real in stack:
        notes.append(f"{path.name}: included from itself (loop); skipped")
        return current
    if len(stack) >= MAX_DEPTH:
        notes.append(f"{path.name}: includes nested deeper than {MAX_DEPTH}; skipped")
        return current
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        notes.append(f"{path.name}: cannot read ({exc.strerror})")
        return current
    stack = [*stack, real]
    in_block = False
    for n, raw in enumerate(text.splitlines(), 1):
        where = f"{path.name}:{n}"
        stripped = raw.strip()
        inc = _INCLUDE.match(stripped) if not in_block else None
        if inc:
            kind, target = inc.group(1).lower(), inc.group(2).strip().strip('"').strip("<>").strip()
            if kind == "exec":
                notes.append(f"{where}: #exec is not run by tm4; its output is not considered")
                continue
            pattern = target if target.startswith("/") else str(base / target)
            matches = sorted(glob.glob(pattern))
            if not matches and kind == "include":
                notes.append(f"{where}: #include {target}: not found")
            for m in matches:
                if root is not None and not Path(m).resolve().is_relative_to(root):
                    notes.append(f"{where}: #{kind} {target}: outside the configuration directory; refused, not read")
                    continue
                current = _read(Path(m), base, sections, notes, stack, current, root)
            continue
        line, in_block = _strip_comment(raw, in_block)
        line = line.strip()
        if not line:
            continue
        if line.startswith("["):
            m = _SECTION.match(line)
            if not m:
                notes.append(f"{where}: unreadable section header {line[:60]!r}")
                current = None
                continue
            flags = [f.strip() for f in (m.group(2) or "").split(",") if f.strip()]
            name = m.group(1).strip()
            adds = [f for f in flags if f.startswith("+")]
            if adds:  # [name](+) or [name](+type=endpoint): add to the FIRST matching section
                prev = next((s for s in sections if s.name == name
                             and _matches(s, adds[0][1:], sections)), None)
                if prev is not None:
                    current = prev
                    continue
                notes.append(f"{where}: [{name}]({adds[0]}) adds to a section that is not defined "
                             "before it (Asterisk refuses the whole file)")
            current = Section(
                name=name, where=where, is_template="!" in flags,
                templates=tuple(f for f in flags if f != "!" and not f.startswith("+")),
            )
            sections.append(current)
            continue
        key, sep, value = line.partition("=")
        if not sep:
            notes.append(f"{where}: not a 'key = value' line: {line[:60]!r}")
            continue
        key = key.strip().lower()
        value = value.strip()
        if value.startswith(">"):  # key => value
            value = value[1:].strip()
        if current is None:
            notes.append(f"{where}: option {key!r} outside any section; ignored")
            continue
        current.options.append(Option(key, value, where))
    return current


def _inherited(section: Section, sections: list[Section], depth: int = 0) -> list[Option]:
    """A section's options with its templates' first (Asterisk copies them at the header)."""
    out: list[Option] = []
    for t in section.templates:
        tmpl = next((s for s in sections if s.name == t and s is not section), None)
        if tmpl is not None and depth < MAX_DEPTH:
            out += _inherited(tmpl, sections, depth + 1)
    return out + section.options


def _matches(section: Section, flt: str, sections: list[Section]) -> bool:
    """Asterisk's `(+key=regex)` qualifier (several joined by &); empty matches all."""
    options = _inherited(section, sections)
    for part in filter(None, flt.split("&")):
        key, _, want = part.partition("=")
        try:
            kre, vre = re.compile(key.strip(), re.IGNORECASE), re.compile(want.strip())
        except re.error:
            return False
        if not any(kre.fullmatch(o.key) and vre.search(o.value) for o in options):
            return False
    return True


def _apply_templates(sections: list[Section], notes: list[str]) -> None:
    """Each section gets its templates' options first (in order), then its own."""
    by_name: dict[str, Section] = {}
    resolved: dict[int, list[Option]] = {}

    for s in sections:
        inherited: list[Option] = []
        for t in s.templates:
            tmpl = by_name.get(t)
            if tmpl is None:
                notes.append(f"{s.where}: [{s.name}] uses template {t!r}, which is not defined before it")
                continue
            inherited.extend(resolved.get(id(tmpl), tmpl.options))
        full = inherited + s.options
        resolved[id(s)] = full
        by_name[s.name] = s
    for s in sections:
        s.options = resolved[id(s)]
