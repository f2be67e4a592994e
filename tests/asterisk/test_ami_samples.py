"""One sample file per security event type, each frame with its expected verdict beside it.

As fail2ban does for its filters: the suite fails when an event type has no
sample. Captured samples must be found byte for byte in a capture; the others
must say SYNTHESIZED.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from amisim import FIXTURES

from tm4.asterisk.events import EventType, FrameParser, to_security_event
from tm4.guard.policy import classify
from tm4.lab.sim.ami import field_order

SAMPLES = Path(__file__).parent.parent / "samples" / "ami"
CAPTURES = [p.read_bytes() for p in sorted(FIXTURES.glob("*.raw"))]


@dataclass
class Sample:
    file: str
    source: str
    expect: dict[str, Any]
    frame: bytes


def load_samples() -> list[Sample]:
    out: list[Sample] = []
    for path in sorted(SAMPLES.glob("*.ami")):
        data = path.read_bytes()
        source, expect = "", None
        frame_lines: list[bytes] = []
        for line in data.split(b"\r\n"):
            if line.startswith(b"# source: "):
                source = line[10:].decode()
            elif line.startswith(b"# expect: "):
                expect = json.loads(line[10:])
            elif line.startswith(b"# "):
                continue
            elif line == b"" and frame_lines:
                assert expect is not None, f"{path.name}: frame without '# expect:'"
                out.append(Sample(path.name, source, expect, b"\r\n".join(frame_lines) + b"\r\n\r\n"))
                frame_lines, expect = [], None
            elif line:
                frame_lines.append(line)
        assert not frame_lines, f"{path.name}: last frame not closed by an empty line"
    return out


ALL = load_samples()


def test_every_event_type_has_a_sample_file() -> None:
    files = {p.stem for p in SAMPLES.glob("*.ami")}
    missing = {t.value for t in EventType} - files
    assert not missing, f"event types without a sample: {sorted(missing)}"
    covered = {s.expect["type"] for s in ALL}
    assert covered >= {t.value for t in EventType}


def test_sample_files_use_crlf_only() -> None:
    for p in SAMPLES.glob("*.ami"):
        data = p.read_bytes()
        assert b"\n" not in data.replace(b"\r\n", b""), p.name


@pytest.mark.parametrize("s", ALL, ids=[f"{s.file}:{s.expect['service']}" for s in ALL])
def test_sample_parses_to_its_expected_verdict(s: Sample) -> None:
    frames = FrameParser().feed(s.frame)
    assert len(frames) == 1
    ev = to_security_event(frames[0])
    e = s.expect
    assert ev is not None
    assert ev.type.value == e["type"]
    assert s.file == f"{e['type']}.ami"
    assert ev.service == e["service"]
    assert ev.account == e["account"]
    assert ev.remote is not None
    assert str(ev.remote.address) == e["remote"]
    assert ev.remote.port == e["port"]
    assert ev.remote.transport == e["transport"]
    assert classify(ev).value == e["verdict"]
    for name, value in e.get("fields", {}).items():
        assert ev.field(name) == value, name


@pytest.mark.parametrize("s", ALL, ids=[f"{s.file}:{s.expect['service']}" for s in ALL])
def test_captured_samples_are_verbatim_and_synthesized_ones_say_so(s: Sample) -> None:
    if s.source.startswith("captured"):
        assert any(s.frame in c for c in CAPTURES), "a 'captured' sample must appear byte for byte in a capture"
    else:
        assert "SYNTHESIZED" in s.source
        assert not any(s.frame in c for c in CAPTURES)
    # Framing and field order as Asterisk writes them.
    names = [ln.split(b":", 1)[0].decode() for ln in s.frame.split(b"\r\n") if ln]
    assert names[:2] == ["Event", "Privilege"]
    order = field_order(s.expect["type"], s.expect["service"])
    assert names[2:] == [n for n in order if n in names[2:]]
