"""`tm4 install` / `tm4 uninstall`: lay out on a PBX what the tm4 package ships, rendered
for this host, and take away exactly that again.

What goes where (host paths; `--root DIR` puts them under DIR, as packagers do):
- the classic AGI launcher: astagidir/tm4-dialin.agi, its first line naming the python
  of the venv tm4 runs from (Asterisk execs it through that line), SOCKET = [daemon] socket;
- the prompts: astdatadir/sounds/en/tm4/ (played as tm4/enter-passcode, ...);
- the dialplan context: astetcdir/extensions_tm4.conf, with [daemon] socket and fastagi;
- the systemd units for this venv's tm4d (tm4.daemon.units);
- tm4.toml as the commented skeleton, only when there is none, and the state directory;
- links to this venv's tm4 and tm4d in /usr/local/bin, when it is not already there.

A manifest (state_dir/installed.json) records each file with its SHA-256 and each
directory install created. Uninstall removes a file only while it is still what install
wrote: the admin's config (once changed) and the state stay. A second install updates
what changed and removes what the new version no longer ships.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from tm4 import __version__
from tm4.asterisk.dirs import AsteriskDirs
from tm4.core.config import Config
from tm4.core.errors import ConfigError, Tm4Error
from tm4.daemon.initsetup import config_skeleton
from tm4.daemon.shipped import AGI_SCRIPT, DIALPLAN, prompts, shipped_text
from tm4.daemon.units import protect_home_for, render_units

MANIFEST = "installed.json"
AGI_NAME = "tm4-dialin.agi"
DIALPLAN_NAME = "extensions_tm4.conf"
UNIT_DIR = "/etc/systemd/system"
BIN_DIR = "/usr/local/bin"
# What the shipped dialplan and AGI script are written for.
SHIPPED_SOCKET = "/run/tm4/tm4.sock"
SHIPPED_FASTAGI = "agi://127.0.0.1:4573/"
SHIPPED_SOCKET_LINE = f'SOCKET = "{SHIPPED_SOCKET}"\n'
# AF_UNIX allows 107 bytes; Asterisk's dialplan splits arguments on , and ) and expands ${}.
_SOCKET_RE = re.compile(r"/[A-Za-z0-9._/@+-]{1,106}")
# The kernel reads at most 255 bytes of a #! line; blanks would split it.
_PYTHON_RE = re.compile(r"/[A-Za-z0-9._/@+-]{1,200}")


class NotInstalled(Tm4Error):
    """`tm4 uninstall` found no record of an install."""


@dataclass(frozen=True)
class Piece:
    path: str  # absolute host path
    what: str  # agi, prompt, dialplan, unit, config, link
    data: bytes = b""
    mode: int = 0o644
    target: str = ""  # a link's target
    if_absent: bool = False  # written only when nothing is there (the config)


@dataclass(frozen=True)
class Host:
    """Where tm4 runs from and where Asterisk keeps its files."""

    python: str  # the interpreter of the venv tm4 is installed in (sys.executable)
    tm4d: str
    config_path: str
    config: Config
    dirs: AsteriskDirs
    tm4: str = ""  # the tm4 command beside tm4d (linked into /usr/local/bin)
    bin_dir: str = BIN_DIR


# -- rendering ------------------------------------------------------------------------------

def socket_path(value: str) -> str:
    parts = value[1:].split("/")
    if not _SOCKET_RE.fullmatch(value) or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"[daemon] socket {value!r} cannot be named in Asterisk's dialplan: use an "
                          "absolute path of letters, digits and . _ / @ + - (at most 107 bytes)")
    return value


def fastagi_url(value: str) -> str:
    """agi://HOST:PORT/ for Asterisk from [daemon] fastagi; a wildcard listener is reached on loopback."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or getattr(ip, "scope_id", None):
            raise ValueError
    except ValueError:
        raise ConfigError(f"[daemon] fastagi {value!r} must be IP:PORT, e.g. 127.0.0.1:4573") from None
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"agi://{ip if ip.version == 4 else f'[{ip}]'}:{int(port)}/"


def render_launcher(template: str, python: str, socket: str) -> str:
    """The AGI entry point with its #! naming `python` (isolated mode: no PYTHON* variables,
    no script directory on sys.path) and the configured control socket."""
    if not _PYTHON_RE.fullmatch(python):
        raise ConfigError(f"the python {python!r} cannot be named on a #! line: it needs an absolute "
                          "path without blanks of at most 200 bytes")
    first, _, rest = template.partition("\n")
    if not first.startswith("#!") or rest.count(SHIPPED_SOCKET_LINE) != 1:
        raise Tm4Error(f"the shipped {AGI_SCRIPT} is not the launcher tm4 knows; reinstall tm4")
    return f"#!{python} -I\n" + rest.replace(SHIPPED_SOCKET_LINE, f'SOCKET = "{socket_path(socket)}"\n')


def render_dialplan(template: str, socket: str, fastagi: str) -> str:
    """The [tm4-dialin] context for this host: its control socket and FastAGI address; with
    FastAGI off ("") it goes to classic AGI straight away."""
    call = f"AGI({AGI_NAME},{SHIPPED_SOCKET})"
    if template.count(call) != 1 or template.count(f"AGI({SHIPPED_FASTAGI}") != 1:
        raise Tm4Error(f"the shipped {DIALPLAN} is not the context tm4 knows; reinstall tm4")
    text = template.replace(SHIPPED_SOCKET, socket_path(socket))
    if fastagi:
        url = fastagi_url(fastagi)
        return text.replace(SHIPPED_FASTAGI, url).replace(SHIPPED_FASTAGI[6:-1], url[6:-1])
    out = []
    for line in text.splitlines(keepends=True):
        if f"AGI({SHIPPED_FASTAGI}" in line:
            line = ' same => n,Goto(classic,1)                           ; FastAGI is off ([daemon] fastagi = "")\n'
        out.append(line)
    return "".join(out)


def plan(host: Host) -> list[Piece]:
    """Every file install puts down for this host."""
    cfg, dirs = host.config, host.dirs
    socket = cfg.daemon.socket
    pieces = [Piece(str(dirs.agi / AGI_NAME), "agi",
                    render_launcher(shipped_text(AGI_SCRIPT), host.python, socket).encode(), 0o755)]
    prompt_dir = dirs.sounds / "en" / "tm4"
    pieces += [Piece(str(prompt_dir / name), "prompt", data) for name, data in prompts()]
    pieces.append(Piece(str(dirs.etc / DIALPLAN_NAME), "dialplan",
                        render_dialplan(shipped_text(DIALPLAN), socket, cfg.daemon.fastagi).encode()))
    pieces += service_pieces(host.tm4d, host.config_path, cfg, str(dirs.etc),
                             protect_home_for(host.tm4d, host.python, host.config_path, str(cfg.state_dir)))
    venv_bin = str(Path(host.tm4d).parent)
    if venv_bin != host.bin_dir:
        pieces.append(Piece(f"{host.bin_dir}/tm4d", "link", target=host.tm4d))
        if host.tm4:
            pieces.append(Piece(f"{host.bin_dir}/tm4", "link", target=host.tm4))
    return pieces


def service_pieces(tm4d: str, config_path: str, cfg: Config, asterisk_etc: str,
                   protect_home: str) -> list[Piece]:
    """The systemd units for `tm4d` and the config skeleton (`tm4 install-service` is these alone)."""
    units = render_units(tm4d, config_path, str(cfg.state_dir), asterisk_etc, protect_home, cfg.daemon.socket)
    pieces = [Piece(f"{UNIT_DIR}/{name}", "unit", text.encode()) for name, text in units.items()]
    pieces.append(Piece(config_path, "config", config_skeleton().encode(), 0o600, if_absent=True))
    return pieces


def unreachable_dir(path: str) -> str | None:
    """The first directory on the way to `path` (links followed) that a user other than its
    owner cannot pass (no o+x): Asterisk, not root, could not exec through it."""
    real = os.path.realpath(path)
    probe = Path("/")
    for part in Path(real).parts[1:-1]:
        probe = probe / part
        try:
            if not probe.stat().st_mode & stat.S_IXOTH:
                return str(probe)
        except OSError:
            return str(probe)
    return None


# -- laying out -------------------------------------------------------------------------

@dataclass
class Result:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # the admin's: left as they are
    removed: list[str] = field(default_factory=list)
    dirs_removed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    manifest: str = ""

    def to_json(self) -> dict[str, object]:
        return {"written": self.written, "unchanged": self.unchanged, "kept": self.kept,
                "removed": self.removed, "dirs_removed": self.dirs_removed,
                "warnings": self.warnings, "manifest": self.manifest}


def under(root: str | Path, host_path: str | Path) -> Path:
    return Path(root) / str(host_path).lstrip("/")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(p: Path) -> str | None:
    try:
        return _sha(p.read_bytes()) if p.is_file() and not p.is_symlink() else None
    except OSError:
        return None


def _makedirs(root: Path, host_dir: Path, created: list[str], mode: int = 0o755) -> None:
    missing = []
    d = host_dir
    while not under(root, d).exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        m = mode if d == host_dir else 0o755
        under(root, d).mkdir(mode=m)
        under(root, d).chmod(m)  # not the umask's choice: Asterisk must read them
        created.append(str(d))


def _write(dest: Path, data: bytes, mode: int) -> None:
    """Atomically, in place of whatever is there (an old symlink into a checkout included)."""
    tmp = dest.with_name(f".{dest.name}.tm4-new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, dest)


def manifest_path(root: str | Path, state_dir: str | Path) -> Path:
    return under(root, state_dir) / MANIFEST


def load_manifest(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise Tm4Error(f"{path} is unreadable ({exc}); move it away to start afresh") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise Tm4Error(f"{path} is not tm4's install manifest; move it away to start afresh")
    return data


def install(pieces: list[Piece], root: str | Path, state_dir: str | Path, *, partial: bool = False) -> Result:
    """`partial`: `pieces` are only some of what tm4 installs (install-service): what the
    manifest holds besides them stays installed and recorded."""
    root = Path(root)
    res = Result()
    mpath = manifest_path(root, state_dir)
    old = load_manifest(mpath) or {"files": {}, "dirs": []}
    old_files: dict[str, dict[str, str]] = old["files"]  # type: ignore[assignment]
    created: list[str] = list(old.get("dirs", []))  # type: ignore[arg-type]
    files: dict[str, dict[str, str]] = {}
    root.mkdir(parents=True, exist_ok=True)
    _makedirs(root, Path(str(state_dir)), created, 0o750)
    for p in pieces:
        dest = under(root, p.path)
        _makedirs(root, Path(p.path).parent, created)
        if p.what == "link":
            if dest.is_symlink() and os.readlink(dest) == p.target:
                res.unchanged.append(p.path)
            elif dest.exists() and not dest.is_symlink():
                res.warnings.append(f"{p.path} exists and is not a link; left alone")
                continue
            else:
                with contextlib.suppress(FileNotFoundError):
                    dest.unlink()
                dest.symlink_to(p.target)
                res.written.append(p.path)
            files[p.path] = {"what": p.what, "target": p.target}
            continue
        current = _file_sha(dest)
        if p.if_absent and (dest.exists() or dest.is_symlink()):
            prev = old_files.get(p.path)
            if prev is not None and prev.get("sha256") == current:
                files[p.path] = prev  # still the skeleton install wrote: still install's
            res.kept.append(p.path)
            continue
        want = _sha(p.data)
        if current == want and stat.S_IMODE(dest.stat().st_mode) == p.mode:
            res.unchanged.append(p.path)
        else:
            prev = old_files.get(p.path)
            if prev is not None and current is not None and prev.get("sha256") != current:
                res.warnings.append(f"{p.path} had been changed since it was installed; replaced")
            _write(dest, p.data, p.mode)
            res.written.append(p.path)
        files[p.path] = {"what": p.what, "sha256": want}
    for path, rec in old_files.items():  # shipped before, not any more (or moved elsewhere)
        if path in files:
            continue
        if partial:
            files[path] = rec
        else:
            _remove_if_ours(root, path, rec, res)
    created = [d for d in dict.fromkeys(created) if under(root, d).is_dir()]
    prompt_dirs = {str(Path(path).parent) for path, rec in files.items() if rec.get("what") == "prompt"}
    manifest = {"tm4": __version__, "files": files, "dirs": created, "owned_dirs": sorted(prompt_dirs)}
    _write(mpath, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), 0o644)
    res.manifest = str(mpath)
    return res


def _remove_if_ours(root: Path, path: str, rec: dict[str, str], res: Result) -> None:
    dest = under(root, path)
    if rec.get("what") == "link":
        if dest.is_symlink() and os.readlink(dest) == rec.get("target"):
            dest.unlink()
            res.removed.append(path)
        elif dest.exists() or dest.is_symlink():
            res.kept.append(path)
        return
    if not (dest.exists() or dest.is_symlink()):
        return
    if _file_sha(dest) == rec.get("sha256"):
        dest.unlink()
        res.removed.append(path)
    else:
        res.kept.append(path)  # changed since install: the admin's now


def uninstall(root: str | Path, state_dir: str | Path) -> Result:
    root = Path(root)
    mpath = manifest_path(root, state_dir)
    data = load_manifest(mpath)
    if data is None:
        raise NotInstalled(f"nothing to uninstall: {mpath} does not exist (was tm4 installed with "
                           "`tm4 install`, with this --root and state_dir?)")
    res = Result(manifest=str(mpath))
    files: dict[str, dict[str, str]] = data["files"]  # type: ignore[assignment]
    for path, rec in files.items():
        _remove_if_ours(root, path, rec, res)
    mpath.unlink()
    res.removed.append(str(Path(str(state_dir)) / MANIFEST))
    dirs = {*data.get("dirs", []), *data.get("owned_dirs", [])}  # type: ignore[misc]
    for d in sorted(dirs, key=lambda s: s.count("/"), reverse=True):  # deepest first
        try:
            under(root, d).rmdir()
            res.dirs_removed.append(d)
        except OSError:
            pass  # not empty (the store, the admin's files) or gone already
    return res
