"""What an audit reads: the Asterisk files (parsed, includes confined to the directory)
and a plain snapshot of tm4's own state. Reading is here; every check is pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tm4.asterisk.confparse import ConfFile, read_conf

FILES = ("pjsip.conf", "pjsip_wizard.conf", "sip.conf", "iax.conf", "manager.conf",
         "extensions.conf", "rtp.conf", "acl.conf")


@dataclass
class AsteriskFiles:
    """Each file parsed (None: absent), and what could not be read."""

    confs: dict[str, ConfFile | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def get(self, name: str) -> ConfFile | None:
        return self.confs.get(name)


def load_asterisk(config_dir: str | Path) -> AsteriskFiles:
    """Parse the files an audit looks at; an include leading outside `config_dir` is
    refused and noted, never read."""
    base = Path(config_dir)
    out = AsteriskFiles()
    for name in FILES:
        path = base / name
        if not path.is_file():
            out.confs[name] = None
            continue
        if not path.resolve().is_relative_to(base.resolve()):
            out.confs[name] = None
            out.notes.append(f"{name}: {name}: a link outside the configuration directory; refused, not read")
            continue
        conf = read_conf(path, base, confine=True)
        out.confs[name] = conf
        out.notes.extend(conf.notes)
    return out


@dataclass(frozen=True)
class EntryInfo:
    name: str
    services: tuple[str, ...]
    networks: tuple[str, ...]  # CIDR texts of what it grants now
    stale: bool
    expired: bool


@dataclass(frozen=True)
class PasscodeInfo:
    owner: str
    created: datetime
    last_used: datetime | None


@dataclass
class Tm4State:
    """The part of tm4's config and store the audit needs (no secrets)."""

    now: datetime
    config_file: str = "tm4.toml"
    public_services: Sequence[str] = ()
    knock_enabled: bool = False
    knock_services: Sequence[str] = ()
    secret_domain: bool = False  # [sip_admission] domains: a REGISTER to one admits its source
    safe_mode: bool = True
    rtp: tuple[int, int] | None = (10000, 20000)
    ami_username: str = "tm4"
    entries: Sequence[EntryInfo] = ()
    passcodes: Sequence[PasscodeInfo] = ()
