"""Tying PJSIP endpoints to their own named ACL (`[tm4-1001]` in acl_tm4.conf) through an
include tm4 owns, pjsip_tm4_endpoints.conf: `[1001](+type=endpoint)` / `acl = tm4-1001`.

Only endpoints pjsip.conf defines as phones BEFORE tm4's #include can be tied: Asterisk
ignores (with a WARNING) a `(+type=endpoint)` section that adds to nothing, so such a tie
would claim a lock that is not there. This module renders and reads the include, says
which endpoints may be tied, and unties those that no longer hold. Writing the ACL
itself and reloading Asterisk is tm4.asterisk.acl's job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tm4.asterisk.audit.inputs import AsteriskFiles
from tm4.asterisk.audit.pbx import read_pbx
from tm4.asterisk.conffile import ConfParseError, atomic_write, parse_conf
from tm4.asterisk.confparse import read_conf as read_full
from tm4.core.config import Config
from tm4.ops.engine import Core

log = logging.getLogger("tm4.asterisk")


ENDPOINT_ACL_PREFIX = "tm4-"


ENDPOINTS_FILE = "pjsip_tm4_endpoints.conf"


def endpoint_acl_name(endpoint: str) -> str:
    return f"{ENDPOINT_ACL_PREFIX}{endpoint}"


def endpoints_path(config: Config) -> Path:
    return Path(config.asterisk.config_dir) / ENDPOINTS_FILE


_TIES_HEADER = """\
; tm4: each endpoint below may register and call only from the addresses of the
; entries that serve it (`tm4 add ... --endpoint NAME`, dial-in passcodes with
; --endpoint), through the named ACL tm4-<endpoint> in acl_tm4.conf.
; Written by `tm4 asterisk install` -- edits are overwritten. pjsip.conf includes
; it at its END: (+type=endpoint) adds to an endpoint defined before it; Asterisk
; ignores (with a WARNING) a section that adds to an endpoint not defined yet.
"""


def render_endpoint_ties(endpoints: Iterable[str]) -> str:
    out = [_TIES_HEADER.rstrip("\n")]
    for ep in sorted(set(endpoints)):
        out += ["", f"[{ep}](+type=endpoint)", f"acl = {endpoint_acl_name(ep)}"]
    return "\n".join(out) + "\n"


def tied_endpoints(config: Config) -> list[str]:
    """The endpoints tm4's include ties to their ACL (none if it is absent or unreadable)."""
    try:
        text = endpoints_path(config).read_text(encoding="utf-8")
        conf = parse_conf(text, ENDPOINTS_FILE)
    except (OSError, UnicodeDecodeError, ConfParseError):
        return []
    return sorted({c for c in conf.categories
                   if endpoint_acl_name(c) in conf.values(c, "acl")})


@dataclass(frozen=True)
class EndpointCandidate:
    endpoint: str
    offered: bool
    reason: str  # why not, when not offered
    tied: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "offered": self.offered, "reason": self.reason or None,
                "tied": self.tied}


def endpoints_named(core: Core) -> set[str]:
    """Endpoints an entry or a dial-in passcode names (the passcodes' grants will)."""
    named = {ep for e in core.entries() for ep in e.endpoints}
    for row in core.store.rows("SELECT endpoints FROM passcodes"):
        with contextlib.suppress(ValueError, TypeError):
            named.update(x for x in json.loads(row[0] or "[]") if isinstance(x, str))
    return named


def _pjsip_endpoints(config: Config) -> dict[str, str]:
    """PJSIP endpoint name -> its kind (phone, trunk, anonymous, other), as pjsip.conf
    defines them (with its includes, tm4's ties left out)."""
    path = Path(config.asterisk.config_dir) / "pjsip.conf"
    conf = read_full(path, path.parent)
    conf.sections = [s for s in conf.sections if not s.where.startswith(f"{ENDPOINTS_FILE}:")]
    pbx = read_pbx(AsteriskFiles(confs={"pjsip.conf": conf}))
    return {e.name: e.kind for e in pbx.endpoints}


def ties_that_hold(config: Config, endpoints: Iterable[str]) -> set[str]:
    """Of `endpoints`, those whose `[EP](+type=endpoint)` adds to an endpoint pjsip.conf
    defines BEFORE tm4's #include: Asterisk ignores (with a WARNING) one that adds to
    nothing, leaving that endpoint without its ACL, and an admin appending a phone after
    the include line is common.
    pjsip.conf is read as Asterisk reads it, with the include holding exactly these ties
    (appended at the end, as `tm4 asterisk install` puts it, when it is not there yet):
    in a scratch directory of links to the real files, nothing real is touched."""
    etc = Path(config.asterisk.config_dir)
    want = sorted(set(endpoints))
    main = etc / "pjsip.conf"
    if not want or not main.is_file():
        return set()
    text = main.read_bytes().decode("utf-8", errors="replace")
    text = text.replace(str(etc / ENDPOINTS_FILE), ENDPOINTS_FILE)  # the scratch copy, not the real one
    if not parse_conf(text, "pjsip.conf").includes_file(ENDPOINTS_FILE, etc):
        text += f'\n#include "{ENDPOINTS_FILE}"\n'
    with tempfile.TemporaryDirectory(prefix="tm4-pjsip-") as tmp:
        scratch = Path(tmp)
        for child in etc.iterdir():
            if child.name not in ("pjsip.conf", ENDPOINTS_FILE):
                (scratch / child.name).symlink_to(child)
        (scratch / "pjsip.conf").write_text(text, encoding="utf-8")
        (scratch / ENDPOINTS_FILE).write_text(render_endpoint_ties(want), encoding="utf-8")
        conf = read_full(scratch / "pjsip.conf", scratch)
    # a (+) section that found nothing to add to is read as a section of its own
    dangling = {s.name for s in conf.sections if s.where.startswith(f"{ENDPOINTS_FILE}:")}
    return {ep for ep in want if ep not in dangling}


def dangling_ties(config: Config) -> list[str]:
    """Endpoints tm4's include adds to that pjsip.conf (as it is now, include where it is)
    does not define before it: Asterisk ignores these, so their ACL is not applied."""
    main = Path(config.asterisk.config_dir) / "pjsip.conf"
    tied = tied_endpoints(config)
    if not tied or not main.is_file():
        return []
    conf = read_full(main, main.parent)
    return sorted({s.name for s in conf.sections if s.where.startswith(f"{ENDPOINTS_FILE}:")} & set(tied))


AFTER_INCLUDE = (f"defined after tm4's #include \"{ENDPOINTS_FILE}\" in pjsip.conf: (+type=endpoint) only adds "
                 "to an endpoint defined before it; move that #include line to the end of pjsip.conf")


def endpoint_candidates(core: Core) -> list[EndpointCandidate]:
    """Each endpoint an entry or passcode names, and whether tm4 may tie it to its ACL:
    only phones defined in pjsip.conf before tm4's include -- never trunks, never the
    anonymous endpoint."""
    kinds = _pjsip_endpoints(core.config)
    tied = set(tied_endpoints(core.config))
    named = sorted(endpoints_named(core) | tied)
    hold = ties_that_hold(core.config, [ep for ep in named if kinds.get(ep) in ("phone", "other")])
    out = []
    for ep in named:
        kind = kinds.get(ep)
        if kind is None:
            why = "not a type=endpoint section of pjsip.conf (wizard endpoints are not supported)"
        elif kind in ("phone", "other") and ep not in hold:
            why = AFTER_INCLUDE
        elif kind == "trunk":
            why = "a trunk: providers are whitelisted by address, not by endpoint"
        elif kind == "anonymous":
            why = "the anonymous endpoint: it serves callers nobody knows"
        else:
            why = ""
        out.append(EndpointCandidate(ep, not why, why, ep in tied))
    return out


def prune_ties(core: Core) -> list[str]:
    """Untie endpoints pjsip.conf no longer defines as phones before tm4's include:
    Asterisk ignores a `(+type=endpoint)` section that adds to an endpoint that is gone
    (or defined only after it), with a WARNING at every reload: the tie would only claim
    a lock that is not there. An unreadable pjsip.conf unties everything."""
    tied = tied_endpoints(core.config)
    if not tied:
        return []
    try:
        kinds = _pjsip_endpoints(core.config)
        phones = [ep for ep in tied if kinds.get(ep) in ("phone", "other")]
        hold = ties_that_hold(core.config, phones)
    except (OSError, ValueError) as exc:
        log.warning("event=pjsip_unreadable reason=%r", str(exc))
        hold = set()
    gone = [ep for ep in tied if ep not in hold]
    if gone:
        keep = [ep for ep in tied if ep in hold]
        path = endpoints_path(core.config)
        atomic_write(path, render_endpoint_ties(keep))
        log.warning("event=endpoint_acl_untied endpoints=%s reason='not a phone pjsip.conf defines before "
                    "tm4 include'", ",".join(gone))
    return gone
