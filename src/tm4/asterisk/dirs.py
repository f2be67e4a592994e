"""Where an Asterisk keeps its files: asterisk.conf's [directories] (astetcdir, astagidir,
astdatadir), read the way Asterisk reads them, with Asterisk's compiled-in defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tm4.asterisk.confparse import read_conf
from tm4.core.errors import ConfigError

DEFAULT_ETC = "/etc/asterisk"
# Asterisk's compiled-in defaults (a build with --prefix=/usr, as every package has).
DEFAULTS = {"astetcdir": DEFAULT_ETC, "astagidir": "/var/lib/asterisk/agi-bin",
            "astdatadir": "/var/lib/asterisk"}


@dataclass(frozen=True)
class AsteriskDirs:
    config_file: Path  # asterisk.conf (may not exist: then every directory is the default)
    etc: Path  # astetcdir: extensions.conf, acl.conf, manager.conf, ...
    agi: Path  # astagidir: where AGI(name) finds its script
    data: Path  # astdatadir: sounds/ lives here
    notes: tuple[str, ...] = ()

    @property
    def sounds(self) -> Path:
        return self.data / "sounds"

    def to_json(self) -> dict[str, object]:
        return {"asterisk_conf": str(self.config_file), "astetcdir": str(self.etc),
                "astagidir": str(self.agi), "astdatadir": str(self.data), "notes": list(self.notes)}


def _directory(key: str, value: str, where: str) -> Path:
    """A directory value as Asterisk would use it; refused when tm4 could not write there safely."""
    if not value.startswith("/") or any(c in value for c in "\0\n\r"):
        raise ConfigError(f"{where}: {key} => {value!r} is not an absolute directory path")
    parts = PurePosixPath(value).parts
    if ".." in parts:
        raise ConfigError(f"{where}: {key} => {value!r} goes up with '..'; write the real path")
    return Path(str(PurePosixPath(value)))


def asterisk_dirs(where: str | Path | None = None, config_dir: str | Path = DEFAULT_ETC) -> AsteriskDirs:
    """`where`: asterisk.conf itself or the directory holding it (the `--asterisk` option);
    None: `config_dir`/asterisk.conf ([asterisk] config_dir). A directory without an
    asterisk.conf is taken as astetcdir, the rest left at the defaults."""
    if where is None:
        conf, etc_default = Path(config_dir) / "asterisk.conf", str(config_dir)
    else:
        p = Path(where)
        if p.is_dir():
            conf, etc_default = p / "asterisk.conf", str(p)
        elif p.is_file():
            conf, etc_default = p, DEFAULTS["astetcdir"]
        else:
            raise ConfigError(f"{p} is neither Asterisk's asterisk.conf nor a directory")
    values = dict(DEFAULTS, astetcdir=etc_default)
    notes: list[str] = []
    if conf.is_file():
        parsed = read_conf(conf)
        notes += parsed.notes
        # `[directories](!)` is a template (Asterisk's sample ships it so): not in force.
        sections = [s for s in parsed.sections if s.name == "directories" and not s.is_template]
        for key in DEFAULTS:
            for s in sections:
                opt = next((o for o in reversed(s.options) if o.key == key), None)
                if opt is not None:
                    values[key] = opt.value
                    break
            else:
                notes.append(f"{conf.name}: no {key}; Asterisk's default {values[key]}")
    else:
        notes.append(f"{conf}: not found; Asterisk's default directories assumed")
    return AsteriskDirs(conf, *(_directory(k, values[k], str(conf)) for k in DEFAULTS),
                        notes=tuple(notes))
