"""The prompts: rendered, Asterisk-ready (8 kHz mono 16-bit wav + gsm), audible; and call-time speech."""

from __future__ import annotations

import re
import subprocess
import wave
from pathlib import Path

import pytest
from agisim import Caller, Channel, Line, run_fastagi
from conftest import need_root_tools
from dialin_support import add_passcode, fastagi_server, make_core

from tm4.dialin.tts import PREFIX_TEXTS, Speech

ROOT = Path(__file__).resolve().parent.parent.parent
SOUNDS = ROOT / "sounds"


def prompts(path: Path = SOUNDS / "prompts.txt") -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, text = (p.strip() for p in line.split("|", 1))
            out[name] = text
    return out


def sox_stat(path: Path) -> dict[str, float]:
    r = subprocess.run(["sox", str(path), "-n", "stat"], capture_output=True, text=True, check=True)
    stats = {}
    for line in r.stderr.splitlines():
        m = re.match(r"(.+?):\s+(-?[\d.]+)$", line)
        if m:
            stats[m.group(1).strip()] = float(m.group(2))
    return stats


def soxi(path: Path) -> dict[str, str]:
    r = subprocess.run(["soxi", str(path)], capture_output=True, text=True, check=True)
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in r.stdout.splitlines()) if v}


def test_every_prompt_is_rendered_and_nothing_else() -> None:
    names = set(prompts())
    assert len(names) >= 20
    rendered = {p.stem for p in (SOUNDS / "en").glob("*.wav")}
    assert rendered == names
    assert {p.stem for p in (SOUNDS / "en").glob("*.gsm")} == names


@pytest.mark.parametrize("name", sorted(prompts()))
def test_prompt_is_8khz_mono_16bit_and_not_silent(name: str) -> None:
    need_root_tools("sox", "soxi")
    wav = SOUNDS / "en" / f"{name}.wav"
    with wave.open(str(wav)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        assert 0.3 < w.getnframes() / 8000 < 15
    info = soxi(wav)
    assert info["Sample Rate"] == "8000" and info["Channels"] == "1" and info["Precision"] == "16-bit"
    st = sox_stat(wav)
    assert st["RMS     amplitude"] > 0.02, "not silent"
    assert st["Maximum amplitude"] > 0.2
    gsm = SOUNDS / "en" / f"{name}.gsm"
    assert soxi(gsm)["Sample Rate"] == "8000"
    assert sox_stat(gsm)["RMS     amplitude"] > 0.02


def test_read_back_texts_match_the_prompts() -> None:
    texts = prompts()
    for prompt, text in PREFIX_TEXTS.items():
        assert texts[prompt.removeprefix("tm4/")] == text


def test_the_render_script(tmp_path: Path) -> None:
    need_root_tools("espeak-ng", "sox")
    src = tmp_path / "p.txt"
    src.write_text("# comment\nhello | Hello there.\n\nbye|Goodbye.\n")
    r = subprocess.run([str(ROOT / "scripts" / "render-sounds.sh"), str(src), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bye.gsm", "bye.wav", "hello.gsm", "hello.wav"]
    with wave.open(str(tmp_path / "out" / "hello.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
    # the committed prompts are what the script makes from prompts.txt (renders are deterministic)
    r = subprocess.run([str(ROOT / "scripts" / "render-sounds.sh"), str(SOUNDS / "prompts.txt"),
                        str(tmp_path / "all")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    same = [p.name for p in (tmp_path / "all").glob("*.wav")
            if p.read_bytes() == (SOUNDS / "en" / p.name).read_bytes()]
    assert len(same) == len(prompts()), "run `make sounds` after editing sounds/prompts.txt"
    bad = src.with_name("bad.txt")
    bad.write_text("Bad Name | x\n")
    assert subprocess.run([str(ROOT / "scripts" / "render-sounds.sh"), str(bad), str(tmp_path / "x")],
                          capture_output=True).returncode != 0


def test_speech_at_call_time(tmp_path: Path) -> None:
    need_root_tools("espeak-ng", "sox")
    sp = Speech("espeak-ng", str(tmp_path / "tts"))
    text = sp.sentence("tm4/you-entered", "203.0.113.7")
    assert text == "You entered 2 0 3 dot 0 dot 1 1 3 dot 7"
    path = sp.render(text)
    assert path is not None
    wav = Path(path + ".wav")
    with wave.open(str(wav)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
    assert sox_stat(wav)["RMS     amplitude"] > 0.02
    mtime = wav.stat().st_mtime_ns
    assert sp.render(text) == path and wav.stat().st_mtime_ns == mtime, "cached"
    assert Speech("no-such-engine", str(tmp_path)).render(text) is None
    assert Speech("", str(tmp_path)).enabled is False


def test_a_call_with_tts_streams_the_synthesized_read_back(tmp_path: Path) -> None:
    need_root_tools("espeak-ng", "sox")
    core = make_core(tmp_path, {"tts": "espeak-ng", "tts_cache": str(tmp_path / "tts")})
    add_passcode(core, "alice", "48213977")
    with fastagi_server(core) as app:
        ch = Channel(Line(), Caller(keys=["48213977#", "203*0*113*7#", "1"]), network=True)
        run_fastagi("127.0.0.1", app.port, ch)
    streamed = [c.split()[2] for c in ch.commands if c.startswith("STREAM FILE /")]
    assert len(streamed) == 2 and all(s.startswith(str(tmp_path / "tts")) for s in streamed)
    assert ch.said == [] and ch.missing == [], "no SAY ALPHA: the sentences are files that exist"
