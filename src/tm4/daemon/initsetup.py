"""`tm4 init` and the config skeleton: first-run detection, then a commented tm4.toml.

Detects the server's addresses, the SSH client's address (granted ssh, so the admin
cannot lock himself out), the LAN networks (offered, never trusted silently: cloud
providers route private ranges between customers) and Asterisk's ports (pjsip.conf
transports' `bind`, rtp.conf's range) when readable.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import re
import subprocess
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from tm4.core import config as config_mod
from tm4.core.config import _SECTIONS, Config
from tm4.core.services import DEFAULT_CATALOGUE

HEADER = """\
# tm4 configuration (/etc/tm4/tm4.toml). Every key is optional: the value shown
# commented out is the default. Uncomment a line to change it.
# This file holds the AMI secret: keep it mode 0600, owned by root.
"""

# Docs for keys whose definition in config.py carries no comment.
EXTRA_DOCS: dict[str, str] = {
    "state_dir": "the SQLite store and tm4d's lock live here",
    "firewall.backend": '"nft" or "iptables"',
    "firewall.public_services": "services open to everyone (then guarded), e.g. [\"sip-udp\"]",
    "firewall.rtp": "RTP media ports, open to everyone (\"\" to close)",
    "firewall.rate_packets": "responsive mode: packets per 10 s from one unknown source to public SIP",
    "firewall.rate_flows": "responsive mode: signalling flows one unknown source may hold open at once",
    "firewall.clamp": "how long a source over those rates is clamped",
    "ami.host": "Asterisk manager interface (tm4's least-privilege user)",
    "ami.port": "",
    "ami.username": "",
    "ami.secret": "written by `tm4 asterisk install`",
    "ami.ping_interval": "how often the guard pings Asterisk (a half-open connection is noticed)",
    "ami.ping_timeout": "a Ping unanswered this long: reconnect",
    "ami.connect_timeout": "",
    "guard.failures": "failed attempts within `window` -> ban",
    "guard.window": "",
    "guard.challenges": "unanswered ChallengeSent within `window` -> ban",
    "guard.bans": "escalating ban lengths for repeat offenders",
    "guard.promote": "SuccessfulAuth with a password -> short SIP grant (revoked on failure)",
    "guard.promote_ttl": "",
    "guard.ipv6_prefix": "IPv6 attackers are banned by this prefix (never covering a whitelisted source)",
    "dialin.external_address": "empty: discover (Asterisk's setting, then DNS)",
    "dialin.tts": '"", "espeak-ng" or "flite"',
    "dialin.grant_services": "what a dial-in grant opens",
    "dialin.grant_ttl": "how long a dial-in grant lasts",
    "dialin.direct_endpoints": "endpoints whose callers may let in their own address (never trunks)",
    "dialin.caller_failures": "wrong passcodes per caller ID within `caller_window` -> cool-down",
    "dialin.caller_window": "",
    "dialin.global_failures": "wrong passcodes (all callers) before every try is delayed",
    "dialin.forbidden": "networks a caller may never let in",
    "dns.nameservers": 'empty: the system\'s resolvers; "ip" or "ip:port"',
    "dns.refresh_min": "re-resolve at the TTL, but not more often than this",
    "dns.refresh_max": "... and at least this often",
    "dns.timeout": "per query",
    "dns.max_addresses": "at most this many addresses from one name",
    "dns.stale_after": "a name failing this long loses its addresses",
    "asterisk.config_dir": "",
    "daemon.socket": "tm4d's control socket (root: everything; the Asterisk group: dial-in only)",
    "daemon.fastagi": 'FastAGI server for the dial-in ("" to turn it off)',
    "daemon.asterisk_group": "the group Asterisk's processes run as",
    "daemon.notify_command": 'argv that gets each alert as JSON on stdin, e.g. ["/usr/local/bin/alert-mail"]',
    "knock.enabled": "port knocking in the kernel",
    "knock.ttl": "how long a completed knock opens the services",
    "knock.protocol": '"tcp" or "udp"',
    "knock.ports": "a fixed sequence; empty: tm4 picks one (`tm4 knock rotate`)",
    "knock.length": "",
    "knock.range": "",
    "knock.step_timeout": "",
    "knock.services": "",
    "knock.activate": "turn a completed knock into a permanent entry",
}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML spelling for {v!r}")


def _field_comments(cls: type) -> dict[str, str]:
    """Comments beside or above each field in config.py: the docs live with the keys."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    last = ""
    for line in src.splitlines()[1:]:
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# ").strip())
            continue
        trailing = s.split("  # ", 1)[1].strip() if "  # " in s else ""
        m = re.match(r"(\w+)\s*:", s)
        if m and not s.startswith(("def ", "@")):
            last = m.group(1)
            out[last] = " ".join([*above, trailing]).strip()
        elif trailing and last:  # the closing line of a multi-line default
            out[last] = " ".join([out[last], trailing]).strip()
        above = []
    return out


def _default(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def config_skeleton(values: dict[str, dict[str, Any]] | None = None) -> str:
    """The whole config, every key commented out with its default; `values`
    ({"": {...top-level}, "firewall": {...}}) are written as real settings."""
    values = values or {}
    out = [HEADER]
    top = values.get("", {})
    out.append(_key_lines("state_dir", str(Config().state_dir), EXTRA_DOCS["state_dir"], top))
    for section, cls in _SECTIONS.items():
        out.append(f"\n[{section}]")
        docs = _field_comments(cls)
        for f in fields(cls):
            doc = docs.get(f.name) or EXTRA_DOCS.get(f"{section}.{f.name}", "")
            out.append(_key_lines(f.name, _default(f), doc, values.get(section, {})))
    out.append("\n# Any catalogue service's ports can be overridden (shown: the defaults).")
    for name, (proto, ports, desc) in DEFAULT_CATALOGUE.items():
        chosen = values.get(f"services.{name}")
        if chosen:
            out.append(f"[services.{name}]  # {desc} ({proto})")
            out.extend(f"{k} = {toml_value(v)}" for k, v in chosen.items())
        else:
            out.append(f"#[services.{name}]  # {desc} ({proto})\n#ports = {toml_value(ports)}")
    for key, chosen in values.items():  # services the admin defined
        if key.startswith("services.") and key[9:] not in DEFAULT_CATALOGUE:
            out.append(f"[{key}]")
            out.extend(f"{k} = {toml_value(v)}" for k, v in chosen.items())
    return "\n".join(out) + "\n"


def _key_lines(key: str, default: Any, doc: str, chosen: dict[str, Any]) -> str:
    lines = [f"# {doc}"] if doc else []
    if key in chosen:
        lines.append(f"{key} = {toml_value(chosen[key])}")
        lines.append(f"#   (default: {toml_value(default)})")
    else:
        lines.append(f"#{key} = {toml_value(default)}")
    return "\n".join(lines)


# -- detection ---------------------------------------------------------------------

@dataclass
class Detected:
    addresses: list[str] = field(default_factory=list)  # the server's own, global scope
    lan: list[str] = field(default_factory=list)  # private networks it sits in (offered)
    ssh_clients: list[str] = field(default_factory=list)
    sip: dict[str, str] = field(default_factory=dict)  # service -> ports, from pjsip.conf
    rtp: str = ""
    notes: list[str] = field(default_factory=list)
    # Tunnels and private LAN interfaces that could be put in a zone (offered, never trusted).
    interfaces: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"addresses": self.addresses, "lan": self.lan, "ssh_clients": self.ssh_clients,
                "sip": self.sip, "rtp": self.rtp, "notes": self.notes, "interfaces": self.interfaces}


TUNNEL_NAME = re.compile(r"(wg|tun|tap|ppp|ipsec|vti|gre|zt|tailscale)\w*")


def zone_candidates(ip_json: str, public: set[str]) -> list[dict[str, str]]:
    """Interfaces worth a zone in `[interfaces]`: tunnels (WireGuard, OpenVPN...) and LAN
    interfaces with private addresses, never one a default route leaves by."""
    out: list[dict[str, str]] = []
    for link in json.loads(ip_json or "[]"):
        name = str(link.get("ifname", ""))
        if not name or name == "lo" or name in public:
            continue
        if TUNNEL_NAME.fullmatch(name) or link.get("link_type") == "none":
            out.append({"name": name, "kind": "tunnel"})
            continue
        for a in link.get("addr_info", []):
            if a.get("scope") == "global" and ipaddress.ip_address(a["local"]).is_private:
                out.append({"name": name, "kind": "lan"})
                break
    return out


def server_addresses(ip_json: str | None = None) -> tuple[list[str], list[str]]:
    """(addresses, private networks) from `ip -j addr`."""
    if ip_json is None:
        try:
            ip_json = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True,
                                     timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return [], []
    addrs: list[str] = []
    lan: list[str] = []
    for link in json.loads(ip_json or "[]"):
        for a in link.get("addr_info", []):
            if a.get("scope") != "global":
                continue
            iface = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
            addrs.append(str(iface.ip))
            net = iface.network
            if net.is_private and net.prefixlen < net.max_prefixlen and str(net) not in lan:
                lan.append(str(net))
    return addrs, lan


def _ini(text: str) -> list[tuple[str, dict[str, str]]]:
    """Asterisk .conf sections as (name, {key: last value}); enough for bind/rtpstart."""
    out: list[tuple[str, dict[str, str]]] = []
    cur: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].strip()
        m = re.match(r"\[([^\]]+)\]", line)
        if m:
            cur = {}
            out.append((m.group(1), cur))
        elif cur is not None and "=" in line:
            k, _, v = line.partition("=")
            cur[k.strip().rstrip(">").lower()] = v.strip()
    return out


def asterisk_ports(config_dir: Path) -> tuple[dict[str, str], str, list[str]]:
    """({service: ports} from pjsip.conf transports, "lo-hi" from rtp.conf, notes)."""
    notes: list[str] = []
    sip: dict[str, set[int]] = {}
    try:
        text = (config_dir / "pjsip.conf").read_text(errors="replace")
    except OSError as exc:
        notes.append(f"pjsip.conf not readable ({exc.strerror}); SIP ports left at their defaults")
        text = ""
    for _name, kv in _ini(text):
        if kv.get("type") != "transport":
            continue
        proto = kv.get("protocol", "udp").lower()
        service = {"udp": "sip-udp", "tcp": "sip-tcp", "tls": "sip-tls"}.get(proto)
        if service is None:
            continue
        bind = kv.get("bind", "")
        m = re.search(r":(\d+)$", bind) if not bind.endswith("]") else None
        port = int(m.group(1)) if m else (5061 if proto == "tls" else 5060)
        sip.setdefault(service, set()).add(port)
    rtp = ""
    try:
        rtext = (config_dir / "rtp.conf").read_text(errors="replace")
        for _name, kv in _ini(rtext):
            if "rtpstart" in kv and "rtpend" in kv:
                rtp = f"{int(kv['rtpstart'])}-{int(kv['rtpend'])}"
    except OSError as exc:
        notes.append(f"rtp.conf not readable ({exc.strerror}); RTP range left at its default")
    except ValueError:
        notes.append("rtp.conf has a rtpstart/rtpend that is not a number; ignored")
    return {k: ",".join(map(str, sorted(v))) for k, v in sip.items()}, rtp, notes


def detect(asterisk_dir: Path = Path("/etc/asterisk"), ip_json: str | None = None,
           ssh_clients: list[str] | None = None) -> Detected:
    from tm4.ops.lockout import ssh_client_addresses

    d = Detected()
    d.addresses, d.lan = server_addresses(ip_json)
    from tm4.ops.zones import public_interfaces

    try:
        links = ip_json if ip_json is not None else subprocess.run(
            ["ip", "-j", "addr"], capture_output=True, text=True, check=True, timeout=10).stdout
        d.interfaces = zone_candidates(links, public_interfaces() if ip_json is None else set())
    except (OSError, subprocess.SubprocessError, ValueError):
        d.interfaces = []
    d.ssh_clients = ssh_clients if ssh_clients is not None else ssh_client_addresses()
    d.sip, d.rtp, d.notes = asterisk_ports(asterisk_dir)
    return d


def plan_config(det: Detected) -> dict[str, dict[str, Any]]:
    """The settings `tm4 init` writes from what it detected."""
    values: dict[str, dict[str, Any]] = {}
    if det.rtp:
        values["firewall"] = {"rtp": det.rtp}
    for service, ports in det.sip.items():
        default = DEFAULT_CATALOGUE[service][1]
        if ports != default:
            values[f"services.{service}"] = {"ports": ports}
    return values


def merge_values(existing_raw: dict[str, Any], detected: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Settings for the skeleton: what init detected, with the admin's existing settings
    (the parsed TOML of the current file) on top — init never throws a setting away."""
    out: dict[str, dict[str, Any]] = {k: dict(v) for k, v in detected.items()}
    for key, value in existing_raw.items():
        if key == "services" and isinstance(value, dict):
            for name, table in value.items():
                out.setdefault(f"services.{name}", {}).update(table)
        elif isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        else:
            out.setdefault("", {})[key] = value
    return out


def write_config(path: Path, text: str, *, overwrite: bool = False) -> None:
    import tomllib

    from tm4.core.errors import ConfigError, ConflictError

    try:  # the text must load, or we would write a config that stops tm4d
        config_mod.parse_config(tomllib.loads(text), path)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"generated config is not valid TOML: {exc}") from None
    if path.exists() and not overwrite:
        raise ConflictError(f"{path} exists; use --overwrite to replace it (a backup is kept)")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists():
        backup = path.with_name(path.name + ".bak")
        backup.write_bytes(path.read_bytes())
        backup.chmod(0o600)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)
