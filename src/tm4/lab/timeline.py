"""The timeline `tm4 lab` prints as it goes: each step ok, failed or skipped, with the
seconds since the lab started and its measured figures; a summary and JSON at the end."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


class StepFailed(Exception):
    """A lab step did not show what it should."""


@dataclass
class Step:
    name: str
    status: str  # ok, failed, skipped
    at: float  # seconds since the lab started
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "at": round(self.at, 3), "detail": self.detail,
                "figures": self.figures}


class Timeline:
    def __init__(self, say: Callable[[str], None] = print):
        self.say = say
        self.t0 = time.monotonic()
        self.steps: list[Step] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def record(self, name: str, status: str, detail: str, **figures: Any) -> Step:
        st = Step(name, status, self.now(), detail, figures)
        self.steps.append(st)
        mark = {"ok": " ok ", "failed": "FAIL", "skipped": "skip"}[status]
        self.say(f"  +{st.at:7.3f}s  [{mark}] {name:10} {detail}")
        return st

    @contextlib.contextmanager
    def step(self, name: str, needs: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """A step: yields a dict to fill with 'detail' and figures; an exception fails it."""
        missing = [n for n in (needs or []) if n]
        if missing:
            self.record(name, "skipped", f"component missing: {'; '.join(missing)}")
            yield {"skip": True}
            return
        box: dict[str, Any] = {}
        try:
            yield box
        except StepFailed as exc:
            self.record(name, "failed", str(exc), **box.get("figures", {}))
            return
        except Exception as exc:  # a step that breaks is reported; the lab goes on and cleans up
            self.record(name, "failed", f"{type(exc).__name__}: {exc}", **box.get("figures", {}))
            return
        self.record(name, "ok", box.get("detail", ""), **box.get("figures", {}))


def summary(steps: list[Step]) -> tuple[str, int]:
    counts = {s: sum(1 for x in steps if x.status == s) for s in ("ok", "failed", "skipped")}
    text = f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped"
    return text, (1 if counts["failed"] else 0)


def steps_json(steps: list[Step]) -> str:
    return json.dumps([s.to_json() for s in steps], indent=2)
