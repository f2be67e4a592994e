"""Who may register or call in: endpoints without an ACL while SIP is reachable from
outside the whitelist, unknown named ACLs, anonymous and guest access to trunks,
chan_sip's allowguest and alwaysauthreject."""

from __future__ import annotations

from tm4.asterisk.audit.dialplan import Dialplan, chain_text, dial_targets, reachable
from tm4.asterisk.audit.finding import Finding, make
from tm4.asterisk.audit.inputs import Tm4State
from tm4.asterisk.audit.pbx import Pbx
from tm4.core.services import ALL, SIP_SERVICES


def sip_exposure(state: Tm4State) -> str:
    """Why SIP is reachable from outside the whitelist ('' if it is not)."""
    public = set(state.public_services)
    if ALL in public or public & set(SIP_SERVICES):
        return "SIP is a public service in tm4 (firewall.public_services)"
    if state.knock_enabled and set(state.knock_services) & {*SIP_SERVICES, ALL}:
        return "port knocking opens SIP to whoever knocks"
    if state.secret_domain:
        return "a secret SIP domain admits whoever sends a REGISTER to it"
    return ""


def check_endpoint_acls(pbx: Pbx, state: Tm4State) -> list[Finding]:
    why = sip_exposure(state)
    out: list[Finding] = []
    for e in pbx.endpoints:
        if e.kind != "phone" or e.tech == "IAX2":
            continue
        if e.acls or e.has_rules or (e.tech == "PJSIP" and pbx.pjsip_global_acl):
            continue
        if not why:
            continue
        out.append(make(
            "endpoint-no-acl", "high" if "public" in why else "medium", e.where,
            f"{e.label} may register from any address",
            f"{why}, and {e.label} has no ACL (acl=, deny=/permit=). Whoever learns or guesses its "
            "credentials can register as it from anywhere in the world.",
            f"Give {e.label} an ACL: `tm4 add OWNER ADDRESS -s sip-udp --endpoint {e.name}` and accept the "
            f"endpoint ACL in `tm4 asterisk install` (adds acl=tm4-{e.name}), or set deny=/permit= yourself.",
        ))
    return out


def check_named_acls(pbx: Pbx) -> list[Finding]:
    out: list[Finding] = []
    for e in pbx.endpoints:
        for name in e.acls:
            if name not in pbx.named_acls:
                out.append(make(
                    "acl-undefined", "medium", e.where, f"{e.label} uses ACL {name!r}, which acl.conf does not define",
                    f"{e.label} names the ACL {name!r}, but acl.conf (with its includes) has no [{name}]. "
                    "Asterisk then applies no rules for it: the endpoint is open to every address.",
                    f"Define [{name}] in acl.conf (for tm4's ACLs: `tm4 asterisk install`), or remove acl={name}.",
                ))
    return out


def trunk_dials(dp: Dialplan, pbx: Pbx, contexts: list[str]) -> list[tuple[str, str, str, str]]:
    """(context, pattern, trunk label, where) for every Dial to a trunk in `contexts`."""
    found = []
    for name in contexts:
        ctx = dp.contexts.get(name)
        for step in ctx.steps if ctx else []:
            for tech, peer in dial_targets(dp, step):
                if pbx.is_trunk(tech, peer):
                    found.append((name, step.pattern, f"{tech}/{peer}", step.where))
    return found


def _truthy(v: str | None, default: bool) -> bool:
    if v is None:
        return default
    return v.strip().lower() in ("yes", "true", "on", "1", "y", "t")


def check_guest_access(pbx: Pbx, dp: Dialplan) -> list[Finding]:
    out: list[Finding] = []
    starts = [(e.label, e.context, e.where) for e in pbx.endpoints if e.kind == "anonymous"]
    g = pbx.sip_general
    if g is not None:
        if _truthy(g.get("allowguest"), True):
            starts.append(("chan_sip guests", g.get("context") or "default", g.where))
            opt = g.get_all("allowguest")
            out.append(make(
                "sip-allowguest", "medium", opt[-1].where if opt else g.where,
                "chan_sip accepts unauthenticated calls (allowguest=yes)",
                "sip.conf [general] has allowguest=yes (the default): anyone may send INVITEs that land in "
                f"context [{g.get('context') or 'default'}] without a password.",
                "Set allowguest=no in sip.conf [general] unless you really take anonymous SIP calls.",
            ))
        if not _truthy(g.get("alwaysauthreject"), True):
            opt = g.get_all("alwaysauthreject")
            out.append(make(
                "sip-alwaysauthreject-off", "medium", opt[-1].where if opt else g.where,
                "chan_sip tells scanners which extensions exist (alwaysauthreject=no)",
                "With alwaysauthreject=no chan_sip answers an unknown user differently from a wrong password, "
                "so scanners (svwar) list your extensions before guessing their secrets.",
                "Set alwaysauthreject=yes in sip.conf [general].",
            ))
    for label, ctx, where in starts:
        chains = reachable(dp, ctx, where, "context=")
        for cname, pattern, trunk, dwhere in trunk_dials(dp, pbx, list(chains)):
            out.append(make(
                "anonymous-reaches-trunk", "high", dwhere,
                f"{label} can dial out through {trunk}",
                f"Unauthenticated callers ({label}, context [{ctx}]) reach extension {pattern} in [{cname}], "
                f"which dials the trunk {trunk}: {chain_text(chains[cname])}. Anyone on the internet can place "
                "calls at your cost.",
                f"Give {label} a context that only reaches internal extensions (or the dial-in), and remove the "
                f"include or jump that leads to [{cname}].",
            ))
    return out
