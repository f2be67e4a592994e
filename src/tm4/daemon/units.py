"""The systemd units, rendered for where tm4d is installed: the shipped systemd/*.service
(written for /usr/local/bin/tm4d and the default paths) with the host's paths put in."""

from __future__ import annotations

from tm4.core.errors import ConfigError
from tm4.daemon.shipped import SYSTEMD, shipped_text

UNIT_NAMES = ("tm4-boot.service", "tm4d.service")
# What the shipped files (systemd/*.service) are rendered for.
SHIPPED_FOR = {"tm4d": "/usr/local/bin/tm4d", "config": "/etc/tm4/tm4.toml", "state_dir": "/var/lib/tm4",
               "asterisk_dir": "/etc/asterisk", "protect_home": "yes", "socket": "/run/tm4/tm4.sock"}
RUNTIME_DIR = "/run/tm4"  # RuntimeDirectory=tm4: writable for the control socket
_UNSAFE = set(" \t\n\r\0\"'\\%$;")  # systemd would split, quote or expand these


def _path(what: str, value: str) -> str:
    if not value.startswith("/") or any(c in _UNSAFE for c in value):
        raise ConfigError(f"{what} {value!r} cannot go into a systemd unit: it must be an absolute "
                          "path without blanks, quotes, '%', '$' or ';'")
    return value


def _render(text: str, v: dict[str, str]) -> str:
    """The shipped unit with its few host-specific lines rewritten."""
    cfg_dir = v["config"].rsplit("/", 1)[0] or "/"
    out = []
    for line in text.splitlines(keepends=True):
        key, sep, value = line.partition("=")
        if sep and key == "ExecStart":
            args = value.partition(" ")[2]  # the program is replaced, its arguments kept
            args = args.replace(f"--config {SHIPPED_FOR['config']}", f"--config {v['config']}")
            line = f"ExecStart={v['tm4d']} {args}"
        elif sep and key == "RequiresMountsFor":
            line = f"RequiresMountsFor={v['state_dir']}\n"
        elif sep and key == "ReadWritePaths":
            # ProtectSystem=strict: a control socket outside /run/tm4 needs its directory writable
            sock_dir = v["socket"].rsplit("/", 1)[0] or "/"
            extra = f" -{sock_dir}" if sock_dir != RUNTIME_DIR else ""
            line = f"ReadWritePaths={v['state_dir']} -{v['asterisk_dir']} -{cfg_dir}{extra}\n"
        elif sep and key == "ProtectHome":
            line = f"ProtectHome={v['protect_home']}\n"
        out.append(line)
    return "".join(out)


def render_units(tm4d: str = "/usr/local/bin/tm4d", config: str = "/etc/tm4/tm4.toml",
                 state_dir: str = "/var/lib/tm4", asterisk_dir: str = "/etc/asterisk",
                 protect_home: str = "yes", socket: str = "/run/tm4/tm4.sock") -> dict[str, str]:
    """`protect_home`: "yes", or "read-only" when tm4 itself lives under /home or /root
    (a checkout's venv there must stay readable)."""
    if protect_home not in ("yes", "read-only"):
        raise ConfigError(f"ProtectHome={protect_home!r}: tm4 renders only yes or read-only")
    values = {"tm4d": _path("tm4d", tm4d), "config": _path("config", config),
              "state_dir": _path("state_dir", str(state_dir)),
              "asterisk_dir": _path("asterisk config_dir", str(asterisk_dir)), "protect_home": protect_home,
              "socket": _path("daemon socket", socket)}
    return {name: _render(shipped_text(f"{SYSTEMD}/{name}"), values) for name in UNIT_NAMES}


HOMES = ("/home/", "/root/", "/run/user/")


def protect_home_for(*paths: str) -> str:
    """ProtectHome=yes hides /home and /root: too much if tm4 is installed there."""
    import os

    real = [os.path.realpath(p) + "/" for p in paths if p]
    return "read-only" if any(r.startswith(HOMES) for r in real) else "yes"
