"""The files a PBX needs, as shipped inside the package (tm4/data/pbx/): the AGI entry
point, the dialplan context, the prompts, the systemd units, the example config.

In a checkout tm4/data/pbx/ holds symlinks to the one copy at the top of the
repository (agi-bin/, dialplan/, sounds/, systemd/, etc/); a wheel carries the files.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

from tm4.core.errors import Tm4Error

AGI_SCRIPT = "agi-bin/tm4-dialin.agi"
DIALPLAN = "dialplan/extensions_tm4.conf"
SOUNDS = "sounds/en"
SYSTEMD = "systemd"
CONFIG_EXAMPLE = "tm4.toml.example"


class ShippedFileMissing(Tm4Error):
    """tm4 was installed without its data files (a broken wheel or checkout)."""


def shipped(rel: str) -> Traversable:
    node = files("tm4").joinpath("data", "pbx", *rel.split("/"))
    if not (node.is_file() or node.is_dir()):
        raise ShippedFileMissing(f"tm4's package lacks data/pbx/{rel}; reinstall tm4 from its wheel")
    return node


def shipped_text(rel: str) -> str:
    return shipped(rel).read_text(encoding="utf-8")


def prompts() -> list[tuple[str, bytes]]:
    """(file name, content) of every dial-in prompt, sorted."""
    d = shipped(SOUNDS)
    return sorted((f.name, f.read_bytes()) for f in d.iterdir()
                  if f.is_file() and f.name.endswith((".wav", ".gsm")))
