"""fail2ban side by side: fail2ban never bans a tm4-whitelisted user.

When fail2ban is installed, tm4 writes a jail.d drop-in that sets `ignoreip` of the
jails protecting Asterisk and SSH to tm4's whitelist (addresses and networks; DNS
names as their current addresses), and reloads those jails when the whitelist
changes, once it has been still for a few seconds (one reload for a burst of
changes). `tm4 status` says whether fail2ban runs, which jails are active and whether
their ignore lists are current.

fail2ban reads jail.conf, jail.d/*.conf, jail.local, then jail.d/*.local: the drop-in
is read last, so its `ignoreip` is what those jails use.

`[fail2ban]` in tm4.toml: `enabled` ("auto": when fail2ban is installed and tm4d
guards the host, not a network namespace), `jail_d` (where the drop-in goes), `jails`
and `debounce` (how long the whitelist must be still before a reload).
"""

from __future__ import annotations

import ast
import hashlib
import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tm4.core.config import Config
from tm4.core.durations import parse_duration
from tm4.core.model import Entry, net_text

if TYPE_CHECKING:
    from tm4.ops.engine import Core

DROPIN_NAME = "tm4-ignoreip.local"
DROPIN = Path("/etc/fail2ban/jail.d") / DROPIN_NAME
JAILS = ("asterisk", "sshd")
# fail2ban's own default (commented out in jail.conf): the host itself stays ignored.
ALWAYS = ("127.0.0.1/8", "::1")
SETTLE = 5.0
JAIL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HEADER = ("# Written by tm4: fail2ban's ignoreip for these jails is tm4's whitelist, so fail2ban\n"
          "# never bans a tm4 user. tm4 rewrites this file when the whitelist changes; put\n"
          "# addresses to ignore in tm4 (`tm4 add`), not here.\n")


def ignore_list(entries: Iterable[Entry], now: datetime) -> list[str]:
    """Every address and network the whitelist grants now, DNS names as their current
    addresses; sorted, IPv4 first, and without networks another one already covers."""
    nets = {n for e in entries if not e.is_expired(now) for n in e.networks()}
    ordered = sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    kept: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for n in ordered:
        if not any(k.version == n.version and n.subnet_of(k) for k in kept):  # type: ignore[arg-type]
            kept.append(n)
    return [net_text(n) for n in kept]


def render_dropin(addresses: Sequence[str], jails: Sequence[str] = JAILS) -> str:
    """The drop-in: one section per jail, the list on continuation lines (fail2ban's
    ini reader joins indented lines to the value)."""
    for j in jails:
        if not JAIL_RE.fullmatch(j):
            raise ValueError(f"bad jail name {j!r}")
    values = [*ALWAYS, *addresses]
    lines = [" ".join(values[i:i + 8]) for i in range(0, len(values), 8)]
    body = "\n    ".join(lines)
    out = [HEADER]
    for j in jails:
        out.append(f"[{j}]\nignoreip = {body}\n")
    return "\n".join(out)


def digest(addresses: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(addresses).encode()).hexdigest()[:16]


def write_dropin(path: Path, text: str) -> bool:
    """Write atomically when the content differs; True if the file changed."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tm4-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def _normalise(items: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for t in items:
        try:
            out.add(net_text(ipaddress.ip_network(t, strict=False)))
        except ValueError:
            out.add(t)  # a DNS name fail2ban keeps as given
    return out


@dataclass
class Fail2ban:
    """How to reach fail2ban: the drop-in's path, the client (with -c/-s for a private
    instance, as in tests) and the jails tm4 manages."""

    dropin: Path = DROPIN
    client: Sequence[str] = ("fail2ban-client",)
    jails: Sequence[str] = JAILS
    timeout: float = 15.0

    @classmethod
    def from_config(cls, cfg: Config) -> Fail2ban:
        f = cfg.fail2ban
        return cls(dropin=Path(f.jail_d) / DROPIN_NAME, jails=tuple(f.jails))

    def installed(self) -> bool:
        return shutil.which(self.client[0]) is not None and self.dropin.parent.parent.is_dir()

    def _run(self, *args: str) -> str | None:
        try:
            p = subprocess.run([*self.client, *args], capture_output=True, text=True, timeout=self.timeout)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout if p.returncode == 0 else None

    def running(self) -> bool:
        out = self._run("ping")
        return out is not None and "pong" in out

    def active_jails(self) -> list[str]:
        out = self._run("status") or ""
        m = re.search(r"Jail list:\s*(.*)", out)
        return [j.strip() for j in m.group(1).split(",") if j.strip()] if m else []

    def ignored(self, jail: str) -> set[str] | None:
        out = self._run("get", jail, "ignoreip")
        if out is None:
            return None
        return _normalise(m.group(1) for m in re.finditer(r"^\s*[|`]- (\S+)\s*$", out, re.M))

    def reload(self, jails: Sequence[str]) -> list[str]:
        """Reload these jails; the ones that failed."""
        return [j for j in jails if self._run("reload", j) is None]

    def banned(self) -> dict[str, list[str]]:
        """Jail -> banned addresses (`fail2ban-client banned` prints a Python literal)."""
        out = self._run("banned")
        try:
            value = ast.literal_eval(out.strip()) if out else []
        except (ValueError, SyntaxError):
            return {}
        found: dict[str, list[str]] = {}
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                for jail, ips in item.items():
                    if isinstance(ips, list):
                        found.setdefault(str(jail), []).extend(str(i) for i in ips)
        return found

    def unban(self, jail: str, address: str) -> bool:
        return self._run("set", jail, "unbanip", address) is not None


@dataclass
class SyncResult:
    written: bool
    reloaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    addresses: int = 0
    unbanned: list[str] = field(default_factory=list)  # "jail address": banned before being whitelisted


def covered(address: str, addresses: Sequence[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for a in addresses:
        try:
            if ip in ipaddress.ip_network(a, strict=False):
                return True
        except ValueError:
            continue
    return False


def sync(core: Core, f2b: Fail2ban) -> SyncResult:
    """Write the drop-in from the whitelist and reload the managed jails that run."""
    res = push(f2b, ignore_list(core.entries(), core.clock()))
    assert res is not None
    return res


def push(f2b: Fail2ban, addrs: Sequence[str], *, only_if_running: bool = False) -> SyncResult | None:
    """Write the drop-in for `addrs`; reload the managed jails if it changed (no store
    access: tm4d runs this in a worker thread). `only_if_running`: touch nothing while
    fail2ban is stopped (None); it reads the drop-in when it starts anyway."""
    running = f2b.running()
    if only_if_running and not running:
        return None
    written = write_dropin(f2b.dropin, render_dropin(addrs, f2b.jails))
    res = SyncResult(written, addresses=len(addrs))
    if written and running:
        active = [j for j in f2b.jails if j in f2b.active_jails()]
        res.failed = f2b.reload(active)
        res.reloaded = [j for j in active if j not in res.failed]
        # ignoreip stops new bans only: a user banned before being whitelisted (who then
        # dialled in, say) is let out now.
        for jail, ips in f2b.banned().items():
            for ip in ips:
                if jail in active and covered(ip, addrs) and f2b.unban(jail, ip):
                    res.unbanned.append(f"{jail} {ip}")
    return res


def wanted(cfg: Config, in_netns: bool) -> bool:
    """Whether tm4d keeps fail2ban's ignore lists: `enabled` true, or "auto" and fail2ban
    is installed and tm4d guards the host (`in_netns`: tm4d itself runs in a namespace)."""
    enabled = cfg.fail2ban.enabled
    if enabled != "auto":
        return enabled == "true"
    # The host's fail2ban belongs to a tm4 guarding the host, not to one that manages
    # a network namespace (the lab, tests).
    return not cfg.firewall.netns and not in_netns and Fail2ban.from_config(cfg).installed()


def settle_seconds(cfg: Config) -> float:
    return parse_duration(cfg.fail2ban.debounce).total_seconds()


class Debounce:
    """Sync once the whitelist has been still for `settle` seconds: a burst of changes
    (a provider enabled, a DNS refresh) makes one reload, not one per entry."""

    def __init__(self, settle: float = SETTLE):
        self.settle = settle
        self.synced: str | None = None
        self.seen: str | None = None
        self.since = 0.0

    def ready(self, key: str, now: float) -> bool:
        if key != self.seen:
            self.seen, self.since = key, now
        return key != self.synced and now - self.since >= self.settle

    def done(self, key: str) -> None:
        self.synced = key


def status_lines(core: Core, f2b: Fail2ban | None = None) -> dict[str, str]:
    """For `tm4 status`: does fail2ban run, which jails, are their ignore lists current."""
    if f2b is None and core.config.fail2ban.enabled == "false":
        left = Fail2ban.from_config(core.config).dropin
        tail = f"; tm4's old drop-in {left} is still there" if left.exists() else ""
        return {"fail2ban": f"not managed ([fail2ban] enabled = false){tail}"}
    f2b = f2b or Fail2ban.from_config(core.config)
    if not f2b.installed():
        return {"fail2ban": "not installed"}
    if not f2b.running():
        return {"fail2ban": "installed, not running"}
    jails = f2b.active_jails()
    want = _normalise([*ALWAYS, *ignore_list(core.entries(), core.clock())])
    stale = []
    for j in (j for j in f2b.jails if j in jails):
        have = f2b.ignored(j)
        if have is None or not want <= have:
            missing = len(want - (have or set()))
            stale.append(f"{j} ({missing} whitelisted address(es) not ignored)")
    out = {"fail2ban": f"running, jails: {', '.join(jails) or 'none'}"}
    managed = [j for j in f2b.jails if j in jails]
    if not managed:
        out["fail2ban ignore lists"] = f"no managed jail active ({', '.join(f2b.jails)})"
    elif stale:
        out["fail2ban ignore lists"] = "OUT OF DATE: " + "; ".join(stale)
    else:
        out["fail2ban ignore lists"] = f"current ({', '.join(managed)})"
    return out
