"""Who is who in the Asterisk files: phones, trunks, anonymous endpoints, secrets.

Pure functions of parsed files (tm4.asterisk.confparse). A trunk is an endpoint
that reaches a provider (outbound auth, an identify match, a static contact, a
registration, a host that is not dynamic); a phone authenticates and registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tm4.asterisk.audit.inputs import AsteriskFiles
from tm4.asterisk.confparse import ConfFile, Section


@dataclass
class Endpoint:
    tech: str  # PJSIP, SIP, IAX2
    name: str
    kind: str  # phone, trunk, anonymous, other
    context: str
    where: str
    acls: list[str] = field(default_factory=list)  # named ACLs it uses
    has_rules: bool = False  # its own deny/permit lines
    call_limit: bool = False

    @property
    def label(self) -> str:
        return f"{self.tech}/{self.name}"


@dataclass(frozen=True)
class Secret:
    kind: str  # "PJSIP auth", "SIP peer", "IAX peer", "AMI user"
    name: str  # the section
    username: str
    value: str
    where: str

    @property
    def label(self) -> str:
        return f"{self.kind} [{self.name}]"


@dataclass
class Pbx:
    endpoints: list[Endpoint] = field(default_factory=list)
    secrets: list[Secret] = field(default_factory=list)
    named_acls: set[str] = field(default_factory=set)  # acl.conf categories
    pjsip_global_acl: bool = False  # a type=acl section guards all of res_pjsip
    sip_general: Section | None = None

    def trunks(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.kind == "trunk"]

    def find(self, tech: str, name: str) -> Endpoint | None:
        return next((e for e in self.endpoints if e.tech == tech and e.name == name), None)

    def is_trunk(self, tech: str, peer: str) -> bool:
        """Does a Dial to TECH/peer leave the PBX? A known trunk, a DAHDI line, or a peer
        that is not a local endpoint but a host name or address."""
        tech = tech.upper()
        if tech in ("DAHDI", "ZAP"):
            return True
        e = self.find(tech, peer)
        if e is not None:
            return e.kind == "trunk"
        return tech in ("PJSIP", "SIP", "IAX2") and ("." in peer or ":" in peer)


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("yes", "true", "on", "1", "y", "t")


def _rules(s: Section) -> bool:
    return bool(s.get_all("deny") or s.get_all("permit") or s.get_all("contact_deny")
                or s.get_all("contact_permit"))


def _acl_names(s: Section, *keys: str) -> list[str]:
    out: list[str] = []
    for k in keys:
        for o in s.get_all(k):
            out += [a.strip() for a in o.value.split(",") if a.strip()]
    return out


def _pjsip(conf: ConfFile, pbx: Pbx) -> None:
    live = [s for s in conf.sections if not s.is_template]
    identified = {(s.get("endpoint") or "").strip() for s in live if s.type == "identify"}
    registrations = {s.name for s in live if s.type == "registration"}
    aors = {s.name: s for s in live if s.type == "aor"}
    auths = {s.name: s for s in live if s.type == "auth"}
    pbx.pjsip_global_acl = any(s.type == "acl" for s in live)
    for s in live:
        if s.type == "auth" and (s.get("auth_type") or "userpass").lower() in ("userpass", ""):
            pbx.secrets.append(Secret("PJSIP auth", s.name, s.get("username") or s.name,
                                      s.get("password") or "", _opt_where(s, "password")))
        if s.type != "endpoint":
            continue
        aor_names = [a.strip() for a in (s.get("aors") or "").split(",") if a.strip()]
        static = any((aors.get(a) and aors[a].get("contact")) for a in aor_names)
        inbound = [a.strip() for a in (s.get("auth") or "").split(",") if a.strip() in auths]
        if s.name == "anonymous":
            kind = "anonymous"
        elif s.get("outbound_auth") or s.name in identified or s.name in registrations or (static and not inbound):
            kind = "trunk"
        elif inbound:
            kind = "phone"
        else:
            kind = "other"
        pbx.endpoints.append(Endpoint(
            "PJSIP", s.name, kind, (s.get("context") or "default").strip(), s.where,
            acls=_acl_names(s, "acl", "contact_acl"), has_rules=_rules(s),
        ))


def _wizard(conf: ConfFile, pbx: Pbx) -> None:
    for s in conf.sections:
        if s.is_template or s.type != "wizard":
            continue
        phone = _truthy(s.get("accepts_registrations")) or bool(s.get("inbound_auth/password"))
        trunk = _truthy(s.get("sends_registrations")) or bool(s.get("remote_hosts")) and not phone
        password = s.get("inbound_auth/password")
        if password is not None:
            pbx.secrets.append(Secret("PJSIP wizard", s.name, s.get("inbound_auth/username") or s.name,
                                      password, _opt_where(s, "inbound_auth/password")))
        pbx.endpoints.append(Endpoint(
            "PJSIP", s.name, "phone" if phone else "trunk" if trunk else "other",
            (s.get("endpoint/context") or "default").strip(), s.where,
            acls=_acl_names(s, "endpoint/acl"),
            has_rules=bool(s.get_all("endpoint/deny") or s.get_all("endpoint/permit")),
        ))


def _sip_like(conf: ConfFile, pbx: Pbx, tech: str, kind_name: str) -> None:
    general = next((s for s in conf.sections if s.name == "general"), None)
    default_ctx = (general.get("context") if general else None) or "default"
    if tech == "SIP":
        pbx.sip_general = general
    for s in conf.sections:
        if s.is_template or s.name in ("general", "authentication") or not s.type:
            continue
        host = (s.get("host") or "dynamic").strip().lower()
        secret = s.get("secret")
        if secret is not None:
            pbx.secrets.append(Secret(kind_name, s.name, s.get("defaultuser") or s.get("username") or s.name,
                                      secret, _opt_where(s, "secret")))
        kind = "phone" if host == "dynamic" else "trunk"
        pbx.endpoints.append(Endpoint(
            tech, s.name, kind, (s.get("context") or default_ctx).strip(), s.where,
            acls=_acl_names(s, "acl", "contactacl"), has_rules=_rules(s),
            call_limit=bool(s.get("call-limit") or s.get("maxcallnumbers")),
        ))


def _manager(conf: ConfFile, pbx: Pbx) -> None:
    for s in conf.sections:
        if s.is_template or s.name == "general":
            continue
        if s.get("secret") is not None:
            pbx.secrets.append(Secret("AMI user", s.name, s.name, s.get("secret") or "", _opt_where(s, "secret")))


def _opt_where(s: Section, key: str) -> str:
    found = s.get_all(key)
    return found[-1].where if found else s.where


def read_pbx(files: AsteriskFiles) -> Pbx:
    pbx = Pbx()
    if (c := files.get("pjsip.conf")) is not None:
        _pjsip(c, pbx)
    if (c := files.get("pjsip_wizard.conf")) is not None:
        _wizard(c, pbx)
    if (c := files.get("sip.conf")) is not None:
        _sip_like(c, pbx, "SIP", "SIP peer")
    if (c := files.get("iax.conf")) is not None:
        _sip_like(c, pbx, "IAX2", "IAX peer")
    if (c := files.get("manager.conf")) is not None:
        _manager(c, pbx)
    if (c := files.get("acl.conf")) is not None:
        pbx.named_acls = {s.name for s in c.sections if not s.is_template}
    return pbx
