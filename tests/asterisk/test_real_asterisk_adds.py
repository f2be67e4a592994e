"""What tm4's endpoint-ACL guard (tm4.asterisk.ties: ties_that_hold, prune_ties) is about,
shown on a real Asterisk: a `[NAME](+type=endpoint)` that adds to an endpoint pjsip.conf
does not define before it is ignored with a WARNING. The rest of pjsip.conf loads (no
outage), but what the section adds, the endpoint's ACL, is silently not there: tm4 must
not leave such a tie believing the phone is locked."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import need_root_tools, real_asterisk
from netlab import Lab

from tm4.lab.asterisk import RealAsterisk


def started(lab: Lab, tmp: Path, users: dict[str, str], include: str) -> RealAsterisk:
    a = RealAsterisk(lab.pbx.ns, tmp, real_asterisk(), moddir=None, tm4_user="tm4",
                     tm4_secret="s" * 24, socket_path="/run/tm4/tm4.sock", fastagi="127.0.0.1:4573",
                     users=users, keys=["1"])
    a.write()
    pj = tmp / "ast" / "etc" / "pjsip.conf"
    pj.write_text(pj.read_text() + '\n#include "pjsip_tm4_endpoints.conf"\n')
    (tmp / "ast" / "etc" / "pjsip_tm4_endpoints.conf").write_text(include)
    a.start()
    time.sleep(0.5)
    return a


def endpoint_acl(a: RealAsterisk, name: str) -> str | None:
    """The endpoint's `acl` as Asterisk loaded it; None if the endpoint is not loaded."""
    shown = a.command(f"pjsip show endpoint {name}")
    if "Unable to find object" in shown:
        return None
    line = next((ln for ln in shown.splitlines() if ln.split(":")[0].strip() == "acl"), "")
    return line.partition(":")[2].strip()


@pytest.mark.asterisk
def test_a_tie_to_a_missing_endpoint_is_ignored_and_the_rest_still_loads(lab: Lab, tmp_path: Path) -> None:
    need_root_tools("ip")
    a = started(lab, tmp_path, {"1001": "secret-1001-long", "1002": "secret-1002-long"},
                "[1001](+type=endpoint)\nacl = tm4-1001\n[1005](+type=endpoint)\nacl = tm4-1005\n")
    try:
        assert endpoint_acl(a, "1001") == "tm4-1001"  # a tie to a defined endpoint holds
        assert endpoint_acl(a, "1002") == ""  # untied, and not given 1005's ACL by mistake
        assert endpoint_acl(a, "1005") is None
        assert "Category addition requested, but category '1005' does not exist" in a.log()
        # the admin renames 1001 and reloads: no outage, 1001's tie is now the ignored one
        pj = tmp_path / "ast" / "etc" / "pjsip.conf"
        pj.write_text(pj.read_text().replace("[1001]", "[1003]"))
        assert "reloaded successfully" in a.command("module reload res_pjsip.so")
        time.sleep(1.0)
        assert endpoint_acl(a, "1003") == "" and endpoint_acl(a, "1002") == ""
        assert endpoint_acl(a, "1001") is None
    finally:
        a.close()
