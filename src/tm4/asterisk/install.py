"""`tm4 asterisk install`: the ACL file, its #include in acl.conf, tm4's AMI user,
the manager reload, and what the admin adds to use the ACL."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tm4.asterisk.acl import (
    ACL_FILE,
    ACL_NAME,
    PENDING_KEY,
    AclSync,
    Chooser,
    EndpointOffer,
    acl_path,
    flush_pending,
    offer_endpoint_acls,
    write_acl,
)
from tm4.asterisk.amiuser import ManagerUser, ami_enabled, ensure_manager_user
from tm4.asterisk.conffile import IncludeEdit, ensure_include, read_conf
from tm4.asterisk.dirs import AsteriskDirs
from tm4.asterisk.reload import AmiError, AmiSession, reload_module
from tm4.core.config import AmiConfig
from tm4.core.errors import ConfigError, ConflictError
from tm4.ops.engine import Core

Rx = Callable[[str], str | None]  # runs an Asterisk CLI command; None: cannot


def asterisk_rx(command: str) -> str | None:
    """`asterisk -rx COMMAND` through Asterisk's control socket (root), if installed."""
    exe = shutil.which("asterisk")
    if exe is None:
        return None
    try:
        p = subprocess.run([exe, "-rx", command], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


@dataclass
class InstallReport:
    acl_file: Path
    acl_written: bool
    include: IncludeEdit
    manager: ManagerUser
    manager_reload: str = ""
    ami_login: str = ""
    acl: AclSync | None = None
    warnings: list[str] = field(default_factory=list)
    endpoint_acls: EndpointOffer | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "acl_file": str(self.acl_file), "acl_written": self.acl_written,
            "include_added": self.include.changed, "acl_conf": str(self.include.path),
            "backup": str(self.include.backup) if self.include.backup else None,
            "manager_user": self.manager.status,
            "manager_where": str(self.manager.where) if self.manager.where else None,
            "manager_reload": self.manager_reload or None, "ami_login": self.ami_login,
            "acl_reload": self.acl.to_json() if self.acl else None, "warnings": self.warnings,
            "endpoint_acls": self.endpoint_acls.to_json() if self.endpoint_acls else None,
            "usage": USAGE.format(name=ACL_NAME).splitlines(),
        }

    def lines(self) -> list[str]:
        out = [f"ACL file:      {self.acl_file} ({'written' if self.acl_written else 'already current'})"]
        inc = self.include
        if inc.created:
            out.append(f"acl.conf:      created {inc.path} with the #include")
        elif inc.changed:
            out.append(f"acl.conf:      #include added to {inc.path} (backup: {inc.backup})")
        else:
            out.append(f"acl.conf:      #include already present in {inc.path}")
        m = self.manager
        if m.status == "created":
            out.append("manager user:  created (read=system,security write=system, loopback only); "
                       "secret written to tm4.toml")
        elif m.status == "unchanged":
            out.append("manager user:  present")
        elif m.status == "exists-elsewhere":
            out.append(f"manager user:  defined by you in {m.where}; left alone "
                       "(tm4.toml [ami] secret must match it)")
        else:
            out.append("manager user:  not created: no manager.conf (AMI is not configured)")
        if self.manager_reload:
            out.append(f"manager:       {self.manager_reload}")
        out.append(f"AMI login:     {self.ami_login}")
        if self.acl is not None:
            if self.acl.reloaded:
                out.append("ACL reload:    done (Action: Reload, Module: acl)")
            elif self.acl.pending:
                out.append(f"ACL reload:    pending until AMI answers ({self.acl.error})")
            else:
                out.append("ACL reload:    not needed")
        out += [f"warning:       {w}" for w in self.warnings]
        out += self.endpoint_acls.lines() if self.endpoint_acls else []
        out.append("")
        out += USAGE.format(name=ACL_NAME).splitlines()
        return out


USAGE = """\
The ACL changes nothing until Asterisk's configuration references it:
  pjsip.conf, a global ACL -- only for strict whitelist servers: every SIP request
  from outside the whitelist gets a stateless 403 and raises NO security event
  (the guard never sees it), and roaming users of public SIP services are shut out:
      [tm4-acl]
      type = acl
      acl = {name}
  pjsip.conf, per endpoint -- outsiders get 401 and a FailedACL security event:
      [1001]
      type = endpoint
      acl = {name}
  sip.conf peers (chan_sip, Asterisk 20 and older) and iax.conf peers:
      acl = {name}
  then apply it: asterisk -rx "module reload res_pjsip.so" (chan_sip.so / chan_iax2.so).
tm4 keeps the ACL's addresses current and reloads it over AMI when they change."""


async def install_async(core: Core, toml_path: Path, *, rx: Rx = asterisk_rx,
                        timeout: float = 5.0, dirs: AsteriskDirs | None = None,
                        endpoint_acls: Chooser | None = None) -> InstallReport:
    """`dirs`: Asterisk's directories from its asterisk.conf (`--asterisk PATH`); by default
    [asterisk] config_dir is astetcdir."""
    cfg = core.config
    configured = cfg.asterisk.config_dir
    if dirs is not None and str(dirs.etc) != configured:
        cfg.asterisk = dataclasses.replace(cfg.asterisk, config_dir=str(dirs.etc))
    config_dir = Path(cfg.asterisk.config_dir)
    if not config_dir.is_dir():
        raise ConfigError(f"Asterisk's config directory {config_dir} does not exist "
                          "(set [asterisk] config_dir in tm4.toml, or name asterisk.conf with --asterisk)")
    acl_conf = config_dir / "acl.conf"
    if acl_conf.exists():  # refuse before writing anything
        _, conf = read_conf(acl_conf)
        if ACL_NAME in conf.categories:
            raise ConflictError(f"{acl_conf} already defines [{ACL_NAME}] itself; rename or remove "
                                "that section, then run this again")
    if (config_dir / "manager.conf").exists():
        read_conf(config_dir / "manager.conf")
    written = write_acl(core)
    inc = ensure_include(acl_conf, ACL_FILE, forbid_category=ACL_NAME,
                         comment="tm4's whitelist as the named ACL [tm4] (tm4 asterisk install)")
    if inc.changed:
        core.store.set_meta(PENDING_KEY, "include added")
    report = InstallReport(acl_path(cfg), written, inc,
                           ensure_manager_user(config_dir, cfg.ami.username, toml_path, cfg.ami.secret))
    if str(config_dir) != configured:
        report.warnings.append(f"asterisk.conf puts Asterisk's configs in {config_dir}: set [asterisk] "
                               f"config_dir = \"{config_dir}\" in {toml_path} so tm4d keeps the ACL there")
    if any(s.startswith("sip-") for s in cfg.firewall.public_services):
        report.warnings.append("SIP is a public service in tm4.toml: a global pjsip ACL would shut "
                               "out everyone outside the whitelist; reference the ACL per endpoint")
    if ami_enabled(config_dir) is False:
        report.warnings.append("manager.conf [general] does not say enabled = yes: AMI is off, "
                               "so tm4 cannot reload the ACL or watch security events")
    from tm4.asterisk.securitylog import install_warnings  # the guard's catch-up source
    report.warnings += await asyncio.to_thread(install_warnings, config_dir, cfg.guard.security_log, rx)
    old = cfg.ami
    if report.manager.changed:
        cfg.ami = dataclasses.replace(old, secret=report.manager.secret)
        report.manager_reload = await _reload_manager(old, rx, timeout)
    report.ami_login = await _try_login(cfg.ami, timeout)
    report.acl = await flush_pending(core, timeout=timeout)
    report.endpoint_acls = await offer_endpoint_acls(core, endpoint_acls, timeout=timeout)
    return report


async def _reload_manager(old: AmiConfig, rx: Rx, timeout: float) -> str:
    """The new user exists only after a manager reload: over AMI with the previous
    credentials if they still work, else through `asterisk -rx`."""
    if old.secret:
        try:
            await reload_module(old, "manager", timeout=timeout)
            return "reloaded over AMI (Module: manager) with the previous credentials"
        except AmiError:
            pass
    out = await asyncio.to_thread(rx, "manager reload")
    if out is not None:
        return "reloaded with asterisk -rx \"manager reload\""
    return "NOT reloaded: run  asterisk -rx \"manager reload\"  then  tm4 asterisk status"


async def _try_login(ami: AmiConfig, timeout: float) -> str:
    try:
        async with AmiSession(ami, timeout=timeout) as s:
            return f"ok as {ami.username!r} ({s.banner})"
    except AmiError as exc:
        return f"failed: {exc}"


def install(core: Core, toml_path: Path, *, rx: Rx = asterisk_rx) -> InstallReport:
    return asyncio.run(install_async(core, toml_path, rx=rx))
