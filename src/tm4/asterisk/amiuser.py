"""tm4's own least-privilege AMI user: a manager.conf include tm4 owns, and the
random secret written to tm4.toml (mode 0600).

The user may read `system,security` (Reload results, security events for the
guard), write `system` (Reload) and log in from loopback only.
"""

from __future__ import annotations

import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tm4.asterisk.conffile import (
    ConfParseError,
    atomic_write,
    ensure_include,
    parse_conf,
    read_conf,
)
from tm4.core.errors import ConfigError, ValidationError

MANAGER_FILE = "manager_tm4.conf"
READ = "system,security"
WRITE = "system"
_USER_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def render_manager_user(username: str, secret: str) -> str:
    if not _USER_RE.fullmatch(username):
        raise ValidationError(f"bad AMI user name {username!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", secret):
        raise ValidationError("the AMI secret must be 16-128 of A-Z a-z 0-9 _ -")
    return (
        "; tm4's own AMI user (least privilege, loopback only). Written by\n"
        "; `tm4 asterisk install`; the same secret is in tm4.toml ([ami] secret).\n"
        f"[{username}]\n"
        f"secret = {secret}\n"
        "deny = 0.0.0.0/0.0.0.0\n"
        "deny = ::/0\n"
        "permit = 127.0.0.1/255.255.255.255\n"
        "permit = ::1/128\n"
        f"read = {READ}\n"
        f"write = {WRITE}\n"
        "displayconnects = no\n"
    )


def new_secret() -> str:
    return secrets.token_urlsafe(24)


def defined_elsewhere(config_dir: Path, username: str) -> Path | None:
    """The manager.conf (or a file it includes, other than tm4's) that already defines
    [username], or None."""
    main = config_dir / "manager.conf"
    if not main.exists():
        return None
    _, conf = read_conf(main)
    if username in conf.categories:
        return main
    for inc in conf.includes:
        p = Path(inc) if inc.startswith("/") else config_dir / inc
        if p.name == MANAGER_FILE or not p.is_file():
            continue
        try:
            _, sub = read_conf(p)
        except ConfParseError:
            continue
        if username in sub.categories:
            return p
    return None


def include_secret(config_dir: Path, username: str) -> str:
    """The secret in tm4's manager include, or ''."""
    p = config_dir / MANAGER_FILE
    try:
        conf = parse_conf(p.read_text(encoding="utf-8"), str(p))
    except (FileNotFoundError, ConfParseError, UnicodeDecodeError):
        return ""
    vals = conf.values(username, "secret")
    return vals[-1] if vals else ""


@dataclass(frozen=True)
class ManagerUser:
    status: str  # "created", "unchanged", "exists-elsewhere", "no-manager-conf"
    secret: str = ""
    where: Path | None = None  # for exists-elsewhere
    include_added: bool = False
    backup: Path | None = None

    @property
    def changed(self) -> bool:
        return self.status == "created"


def ensure_manager_user(config_dir: Path, username: str, toml_path: Path, toml_secret: str) -> ManagerUser:
    """Create tm4's user in manager_tm4.conf and its include in manager.conf, and put
    the secret into tm4.toml. Leaves a user defined by the admin alone, and a host
    without manager.conf (no AMI configured) untouched."""
    main = config_dir / "manager.conf"
    if not main.exists():
        return ManagerUser("no-manager-conf")
    where = defined_elsewhere(config_dir, username)
    if where is not None:
        return ManagerUser("exists-elsewhere", where=where)
    current = include_secret(config_dir, username)
    _, conf = read_conf(main)
    inc_present = conf.includes_file(MANAGER_FILE, config_dir)
    if current and current == toml_secret and inc_present:
        return ManagerUser("unchanged", secret=current)
    secret = new_secret()
    # The secret reaches tm4.toml first: a user tm4 cannot log in as is worse than none.
    set_toml_secret(toml_path, secret)
    atomic_write(config_dir / MANAGER_FILE, render_manager_user(username, secret), like=main,
                 fixed_mode=0o640)  # holds the secret: never world-readable
    edit = ensure_include(main, MANAGER_FILE, comment="tm4's own AMI user (tm4 asterisk install)")
    return ManagerUser("created", secret=secret, include_added=edit.changed, backup=edit.backup)


# -- tm4.toml -------------------------------------------------------------------

_AMI_HEADER = re.compile(r"^[ \t]*\[[ \t]*ami[ \t]*\][ \t]*(#.*)?$")
_ANY_HEADER = re.compile(r"^[ \t]*\[")
_SECRET_LINE = re.compile(r"^[ \t]*secret[ \t]*=")


def set_toml_secret(path: Path, secret: str) -> None:
    """Set `[ami] secret` in tm4.toml, keeping every other line; the file ends up 0600.
    Refuses (ConfigError) a layout it cannot edit safely (inline or dotted `ami` keys)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); not touched") from None
    lines = text.splitlines(keepends=True)
    nl = "\r\n" if "\r\n" in text else "\n"
    new_line = f'secret = "{secret}"{nl}'
    start = next((i for i, ln in enumerate(lines) if _AMI_HEADER.match(ln.rstrip("\r\n"))), None)
    if start is None:
        if "ami" in before:
            raise ConfigError(f"{path}: [ami] is written in a form tm4 cannot edit; "
                              f'set secret = "{secret}" under [ami] by hand')
        prefix = "" if not text or text.endswith(("\n", "\r")) else nl
        new_text = text + prefix + ("" if not text else nl) + f"[ami]{nl}" + new_line
    else:
        end = next((j for j in range(start + 1, len(lines)) if _ANY_HEADER.match(lines[j])), len(lines))
        hit = [j for j in range(start + 1, end) if _SECRET_LINE.match(lines[j])]
        if len(hit) > 1:
            raise ConfigError(f"{path}: [ami] holds secret twice; fix it by hand")
        if hit:
            lines[hit[0]] = new_line
        else:
            lines.insert(start + 1, new_line)
        new_text = "".join(lines)
    try:
        after = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError:
        after = {}
    if after.get("ami", {}).get("secret") != secret or _without_secret(after) != _without_secret(before):
        raise ConfigError(f"{path}: could not set [ami] secret without touching other settings; "
                          "set it by hand")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    atomic_write(path, new_text, mode=0o600, owner=(0, 0), fixed_mode=0o600)


def _without_secret(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    ami = dict(out.get("ami", {}))
    ami.pop("secret", None)
    if ami:
        out["ami"] = ami
    else:
        out.pop("ami", None)
    return out


def ami_enabled(config_dir: Path) -> bool | None:
    """manager.conf's [general] enabled (None: no manager.conf or unreadable)."""
    try:
        _, conf = read_conf(config_dir / "manager.conf")
    except ConfParseError:
        return None
    vals = conf.values("general", "enabled")
    return bool(vals) and vals[-1].lower() in ("yes", "true", "y", "t", "1", "on")
