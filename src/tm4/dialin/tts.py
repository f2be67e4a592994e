"""The read-back sentence synthesized at call time (`[dialin] tts = "espeak-ng"|"flite"`).

Without an engine the transport says the prompt file, then the address with
Asterisk's SAY ALPHA (core sounds: digits and letters/dot). With one, the whole
sentence ("you entered 2 0 3 dot 0 dot 1 1 3 dot 7") becomes one 8 kHz mono
16-bit wav in the cache directory, named by a hash of engine and text, so each
sentence is synthesized once. Any failure falls back to SAY ALPHA.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tm4.dialin.dtmf import spoken

# The texts of the prompts a read-back starts with (as in sounds/prompts.txt).
PREFIX_TEXTS = {
    "tm4/you-entered": "You entered",
    "tm4/your-address": "The address you are calling from is",
    "tm4/server-address": "This server's address is",
}


def engine_argv(engine: str, text: str, out: str) -> list[str] | None:
    if engine == "espeak-ng":
        return ["espeak-ng", "-v", "en-us", "-s", "140", "-w", out, text]
    if engine == "flite":
        return ["flite", "-t", text, "-o", out]
    return None


class Speech:
    def __init__(self, engine: str = "", cache_dir: str = ""):
        self.engine = engine
        self.cache_dir = Path(cache_dir) if cache_dir else None

    @property
    def enabled(self) -> bool:
        return bool(self.engine and self.cache_dir and shutil.which(self.engine) and shutil.which("sox"))

    def sentence(self, prefix: str, address: str) -> str:
        return f"{PREFIX_TEXTS.get(prefix, '')} {spoken(address)}".strip()

    def render(self, text: str) -> str | None:
        """Path (without .wav, as STREAM FILE wants it) of `text` spoken, or None."""
        if not self.enabled or self.cache_dir is None:
            return None
        name = hashlib.sha256(f"{self.engine}\0{text}".encode()).hexdigest()[:24]
        final = self.cache_dir / f"readback-{name}.wav"
        if final.exists():
            return str(final.with_suffix(""))
        argv_ok = engine_argv(self.engine, text, "")
        if argv_ok is None:
            return None
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
                raw = os.path.join(tmp, "raw.wav")
                out = os.path.join(tmp, "out.wav")
                subprocess.run(engine_argv(self.engine, text, raw), check=True, timeout=20,  # type: ignore[arg-type]
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                subprocess.run(["sox", raw, "-r", "8000", "-c", "1", "-b", "16", "-e", "signed-integer", out],
                               check=True, timeout=20, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                os.chmod(out, 0o644)
                os.replace(out, final)
        except (OSError, subprocess.SubprocessError):
            with contextlib.suppress(OSError):
                final.unlink()
            return None
        return str(final.with_suffix(""))
