"""One audit finding, and the severity scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SEVERITIES = ("info", "low", "medium", "high")


def severity_rank(name: str) -> int:
    try:
        return SEVERITIES.index(name)
    except ValueError:
        raise ValueError(f"unknown severity {name!r}: use one of {', '.join(SEVERITIES)}") from None


@dataclass(frozen=True)
class Finding:
    id: str  # stable check id, e.g. "secret-short"
    severity: str
    file: str  # the file (a name inside the Asterisk directory) or "tm4.toml" / "tm4 store"
    line: int | None
    title: str  # names the entry, never a secret
    detail: str  # what is wrong and why it matters
    fix: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "severity": self.severity, "file": self.file, "line": self.line,
                "title": self.title, "detail": self.detail, "fix": self.fix}


def at(where: str) -> tuple[str, int | None]:
    """'pjsip.conf:12' -> ('pjsip.conf', 12)."""
    name, _, line = where.rpartition(":")
    if not name or not line.isdigit():
        return where, None
    return name, int(line)


def make(id: str, severity: str, where: str, title: str, detail: str, fix: str) -> Finding:
    file, line = at(where)
    return Finding(id, severity, file, line, title, detail, fix)
