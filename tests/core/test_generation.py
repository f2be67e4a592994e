"""The nftables ruleset generation, read over netlink: drift checks skip unchanged kernels."""

from __future__ import annotations

import struct

from netlab import Lab

from tm4.firewall.generation import GenerationReader, parse_generation, request_message


def test_request_is_a_getgen_for_the_nftables_subsystem() -> None:
    msg = request_message(7)
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, mtype, flags, seq) == (len(msg), (10 << 8) | 16, 1, 7)


def test_parse_answer_and_refuse_garbage() -> None:
    attr = struct.pack("=HH", 8, 1) + struct.pack(">I", 4242)
    body = struct.pack("=BBH", 0, 0, 0) + attr
    answer = struct.pack("=IHHII", 16 + len(body), (10 << 8) | 15, 0, 1, 0) + body
    assert parse_generation(answer) == 4242
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + b"\0" * 20
    assert parse_generation(error) is None
    assert parse_generation(b"short") is None


def test_generation_moves_with_every_commit_and_only_then(lab: Lab) -> None:
    r = GenerationReader(lab.pbx.ns)
    try:
        a = r.read()
        assert a is not None and r.read() == a
        lab.pbx.run("nft", "add", "table", "inet", "other")
        b = r.read()
        assert b is not None and b > a
        assert r.read() == b
    finally:
        r.close()


def test_idle_daemon_skips_listings_but_still_sees_a_flush(tm4d) -> None:  # type: ignore[no-untyped-def]
    from daemon_support import wait_until

    tm4d.start()
    # after one full clean check (elements included: every 5th check) the ticks are skipped
    assert wait_until(lambda: tm4d.call("status")["drift"]["skipped_checks"] > 0, 12) is not None
    tm4d.nft("flush", "ruleset")
    assert wait_until(lambda: "table inet tm4" in tm4d.nft("list", "tables"), 5) is not None
    assert tm4d.call("status")["drift"]["repairs"] == 1
