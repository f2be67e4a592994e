"""Asterisk .conf files: a strict reader, atomic writes that keep owner and mode,
and the one edit tm4 ever makes to a file it does not own — appending an
`#include` line, idempotently, after a backup.

The reader accepts exactly what Asterisk's config parser understands (comments,
`;-- block comments --;`, `[category](options)`, `key = value`, `key => value`,
`#include`/`#tryinclude`/`#exec`) and refuses anything else: tm4 never edits a
file it cannot read completely.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tm4.core.errors import ConflictError, Tm4Error


class ConfParseError(Tm4Error):
    """An Asterisk config file holds something tm4 does not understand; it is left alone."""


_CATEGORY_RE = re.compile(r"\[([^\[\]]+)\]\s*(\([^()]*\))?")
_DIRECTIVE_RE = re.compile(r"#\s*(include|tryinclude|exec)\s+(.+)", re.IGNORECASE)
_KV_RE = re.compile(r"[^=\s][^=]*?\s*=>?\s*.*")


@dataclass
class ParsedConf:
    categories: list[str] = field(default_factory=list)
    includes: list[str] = field(default_factory=list)  # targets, quotes removed
    # category -> its settings in file order, keys lower-cased
    settings: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    newline: str = "\n"

    def values(self, category: str, key: str) -> list[str]:
        return [v for k, v in self.settings.get(category, []) if k == key.lower()]

    def includes_file(self, name: str, config_dir: Path) -> bool:
        want = {name, str(config_dir / name)}
        return any(t in want for t in self.includes)


def _strip_comment(line: str) -> str:
    """Drop a `;` comment (a `\\;` is a literal semicolon)."""
    out = []
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line) and line[i + 1] == ";":
            out.append(";")
            i += 2
            continue
        if c == ";":
            break
        out.append(c)
        i += 1
    return "".join(out)


def parse_conf(text: str, what: str = "config file") -> ParsedConf:
    """Read an Asterisk config file strictly; raise ConfParseError on anything unknown."""
    if "\0" in text:
        raise ConfParseError(f"{what} holds NUL bytes; not a text config file")
    conf = ParsedConf(newline="\r\n" if "\r\n" in text else "\n")
    current: str | None = None
    in_block = False
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw
        if in_block:
            end = line.find("--;")
            if end < 0:
                continue
            line = line[end + 3:]
            in_block = False
        while ";--" in line:
            start = line.index(";--")
            end = line.find("--;", start + 3)
            if end < 0:
                line = line[:start]
                in_block = True
                break
            line = line[:start] + line[end + 3:]
        s = _strip_comment(line).strip()
        if not s:
            continue
        if s.startswith("#"):
            m = _DIRECTIVE_RE.fullmatch(s)
            if not m:
                raise ConfParseError(f"{what} line {no}: unknown directive {s!r}")
            if m.group(1).lower() != "exec":
                conf.includes.append(m.group(2).strip().strip('"<>').strip())
            continue
        if s.startswith("["):
            m = _CATEGORY_RE.fullmatch(s)
            if not m:
                raise ConfParseError(f"{what} line {no}: malformed category header {s!r}")
            current = m.group(1).strip()
            conf.categories.append(current)
            conf.settings.setdefault(current, [])
            continue
        if _KV_RE.fullmatch(s) and "=" in s:
            if current is None:
                raise ConfParseError(f"{what} line {no}: setting outside any [category]: {s!r}")
            key, _, value = s.partition("=")
            value = value[1:] if value.startswith(">") else value
            conf.settings[current].append((key.strip().lower(), value.strip()))
            continue
        raise ConfParseError(f"{what} line {no}: cannot understand {s!r}")
    if in_block:
        raise ConfParseError(f"{what}: a ';--' block comment is never closed")
    return conf


def read_conf(path: Path) -> tuple[str, ParsedConf]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfParseError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfParseError(f"{path} is not UTF-8 text; tm4 leaves it alone") from None
    return text, parse_conf(text, str(path))


# -- writing ------------------------------------------------------------------

def atomic_write(path: Path, data: str | bytes, *, like: Path | None = None,
                 mode: int = 0o640, owner: tuple[int, int] | None = None,
                 fixed_mode: int | None = None) -> None:
    """Write via a temp file + rename in the same directory. Owner and mode come from
    the file being replaced, else from `like`, else `mode`/`owner`; `fixed_mode`
    overrides the mode in every case (a file holding a secret)."""
    target = Path(os.path.realpath(path))
    ref = target if target.exists() else (like if like is not None and like.exists() else None)
    if ref is not None:
        st = ref.stat()
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    if fixed_mode is not None:
        mode = fixed_mode
    blob = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tm4tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), *owner)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def backup(path: Path, now: datetime | None = None) -> Path:
    """Copy `path` beside itself (`acl.conf.tm4-20260101T120000Z.bak`), owner and mode kept."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    dest = path.with_name(f"{path.name}.tm4-{stamp}.bak")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.tm4-{stamp}-{n}.bak")
        n += 1
    shutil.copy2(path, dest)
    st = path.stat()
    if os.geteuid() == 0:
        os.chown(dest, st.st_uid, st.st_gid)
    return dest


@dataclass(frozen=True)
class IncludeEdit:
    path: Path
    changed: bool
    backup: Path | None = None
    created: bool = False


def ensure_include(path: Path, target: str, *, forbid_category: str | None = None,
                   comment: str = "") -> IncludeEdit:
    """Make `path` hold `#include "target"` exactly once; back it up before an edit.

    Refuses (ConfParseError) a file it cannot parse, and (ConflictError) a file that
    already defines `forbid_category` itself.
    """
    config_dir = path.parent
    if not path.exists():
        text = (f"; {comment}\n" if comment else "") + f'#include "{target}"\n'
        owner = _dir_owner(config_dir)
        atomic_write(path, text, mode=0o640, owner=owner)
        return IncludeEdit(path, True, None, created=True)
    text, conf = read_conf(path)
    if conf.includes_file(target, config_dir):
        return IncludeEdit(path, False)
    if forbid_category and forbid_category in conf.categories:
        raise ConflictError(
            f"{path} already defines [{forbid_category}] itself; tm4 will not add a second one "
            f"(rename or remove that section, then run this again)"
        )
    nl = conf.newline
    add = ""
    if text and not text.endswith(("\n", "\r")):
        add += nl
    if comment:
        add += f"; {comment}{nl}"
    add += f'#include "{target}"{nl}'
    new = text + add
    check = parse_conf(new, str(path))
    if not check.includes_file(target, config_dir):  # pragma: no cover - parse_conf bug guard
        raise ConfParseError(f"{path}: the #include would not be recognised; left alone")
    saved = backup(path)
    atomic_write(path, new)
    return IncludeEdit(path, True, saved)


def _dir_owner(d: Path) -> tuple[int, int]:
    st = d.stat()
    return st.st_uid, st.st_gid
