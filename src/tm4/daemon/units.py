"""The systemd units, rendered for where tm4d is installed. systemd/*.service in the
repository are these, rendered for /usr/local/bin (a test keeps them equal)."""

from __future__ import annotations

BOOT_UNIT = """\
[Unit]
Description=tm4 firewall: load the stored rule set before the network comes up
Documentation=man:tm4(8) https://github.com/tm4/tm4
DefaultDependencies=no
# Before any interface is up, and after nftables.service (whose `flush ruleset`
# would otherwise remove tm4's table again).
Before=network-pre.target shutdown.target
Wants=network-pre.target
After=local-fs.target nftables.service
Conflicts=shutdown.target
RequiresMountsFor={state_dir}

[Service]
Type=oneshot
RemainAfterExit=yes
# Never needs DNS or Asterisk: DNS names load with their last known addresses.
# Decides safe mode (ssh open to all for a few minutes after a short previous boot).
ExecStart={tm4d} --boot --config {config}
StandardOutput=journal
SyslogIdentifier=tm4-boot

[Install]
WantedBy=sysinit.target
"""

DAEMON_UNIT = """\
[Unit]
Description=tm4 firewall daemon (AMI guard, DNS refresh, dial-in, drift repair)
Documentation=man:tm4(8) https://github.com/tm4/tm4
After=tm4-boot.service network-online.target
Wants=tm4-boot.service network-online.target
Before=asterisk.service

[Service]
Type=notify
NotifyAccess=main
ExecStart={tm4d} --config {config}
ExecReload=/bin/kill -HUP $MAINPID
# Stopping tm4d leaves the rules in force (fail closed): no ExecStop.
Restart=on-failure
RestartSec=2s
SyslogIdentifier=tm4d

# Hardened, but able to do all it must.
User=root
# netlink for nftables; Unix for the control socket and journal; TCP for AMI and FastAGI
RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6
# NET_ADMIN: the rules; CHOWN/FOWNER/DAC_OVERRIDE: Asterisk's ACL file written with its
# owner kept and the control socket given to the Asterisk group; KILL: notify_command timeouts
CapabilityBoundingSet=CAP_NET_ADMIN CAP_CHOWN CAP_FOWNER CAP_DAC_OVERRIDE CAP_KILL
AmbientCapabilities=
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={state_dir} {asterisk_dir} -/etc/tm4
RuntimeDirectory=tm4
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=restart
ProtectHome={protect_home}
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# (no MemoryDenyWriteExecute: libnftables is reached through ctypes/libffi)
SystemCallArchitectures=native
# @system-service keeps chown (the ACL file's owner) and everything nft needs
SystemCallFilter=@system-service
SystemCallFilter=~@mount @swap @reboot @obsolete @raw-io @module @cpu-emulation @debug
SystemCallErrorNumber=EPERM
UMask=0027

[Install]
WantedBy=multi-user.target
"""


def render_units(tm4d: str = "/usr/local/bin/tm4d", config: str = "/etc/tm4/tm4.toml",
                 state_dir: str = "/var/lib/tm4", asterisk_dir: str = "/etc/asterisk",
                 protect_home: str = "yes") -> dict[str, str]:
    """`protect_home`: "yes", or "read-only" when tm4 itself lives under /home or /root
    (a checkout's venv there must stay readable)."""
    values = {"tm4d": tm4d, "config": config, "state_dir": state_dir, "asterisk_dir": f"-{asterisk_dir}",
              "protect_home": protect_home}
    return {
        "tm4-boot.service": BOOT_UNIT.format(**values),
        "tm4d.service": DAEMON_UNIT.format(**values),
    }


HOMES = ("/home/", "/root/", "/run/user/")


def protect_home_for(*paths: str) -> str:
    """ProtectHome=yes hides /home and /root: too much if tm4 is installed there."""
    import os

    real = [os.path.realpath(p) + "/" for p in paths if p]
    return "read-only" if any(r.startswith(HOMES) for r in real) else "yes"
