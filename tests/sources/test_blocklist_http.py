"""A blocklist served over HTTP on loopback: conditional refresh, the server going away,
an oversize answer refused; packets from the namespace lab show what the kernel drops."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from netlab import Echo, Lab

from tm4.core.config import parse_config
from tm4.core.errors import ValidationError
from tm4.ops.engine import Core
from tm4.sources import blocklists as bl_mod
from tm4.sources import fetch as fetch_mod


class ListServer:
    """Serves one body with an ETag and a Last-Modified; answers 304 to a matching
    If-None-Match; `length=False` sends no Content-Length (the body ends at close)."""

    def __init__(self) -> None:
        self.body = b""
        self.version = 0
        self.length = True
        self.requests: list[dict[str, str]] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                srv.requests.append({k.lower(): v for k, v in self.headers.items()})
                if self.path != "/voipbl.txt":
                    self.send_error(404)
                    return
                etag = f'"v{srv.version}"'
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", etag)
                self.send_header("Last-Modified", f"Sat, 0{srv.version % 9 + 1} Jan 2000 00:00:00 GMT")
                if srv.length:
                    self.send_header("Content-Length", str(len(srv.body)))
                self.end_headers()
                self.wfile.write(srv.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/voipbl.txt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, text: str) -> None:
        self.body, self.version = text.encode(), self.version + 1

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server() -> Iterator[ListServer]:
    s = ListServer()
    try:
        yield s
    finally:
        s.close()


def test_fetch_is_conditional_and_bounded(server: ListServer) -> None:
    server.serve("203.0.113.66\n")
    got = fetch_mod.fetch(server.url, timeout=5)
    assert got.body == b"203.0.113.66\n" and got.etag == '"v1"' and got.last_modified
    again = fetch_mod.fetch(server.url, etag=got.etag, last_modified=got.last_modified, timeout=5)
    assert again.not_modified and again.etag == '"v1"'
    assert server.requests[-1]["if-none-match"] == '"v1"' and "if-modified-since" in server.requests[-1]
    server.serve("x" * 5000)
    with pytest.raises(fetch_mod.FetchError, match="announces 5000 bytes"):
        fetch_mod.fetch(server.url, max_bytes=1000, timeout=5)
    server.length = False  # no Content-Length: the reader itself stops at the limit
    with pytest.raises(fetch_mod.FetchError, match="over the limit of 1000"):
        fetch_mod.fetch(server.url, max_bytes=1000, timeout=5)
    with pytest.raises(fetch_mod.FetchError, match="HTTP 404"):
        fetch_mod.fetch(server.url.rsplit("/", 1)[0] + "/missing", timeout=5)
    server.length = True
    server.close()
    with pytest.raises(fetch_mod.FetchError, match="cannot fetch"):
        fetch_mod.fetch(server.url, timeout=2)


def test_a_served_list_refreshes_survives_the_server_going_away_and_refuses_oversize(
        lab: Lab, tmp_path: Path, server: ListServer) -> None:
    cfg = parse_config({"state_dir": str(tmp_path / "s"),
                        "firewall": {"netns": lab.pbx.ns, "public_services": ["sip-udp"]}})
    core = Core(cfg, protect=[])
    core.apply()
    echo = Echo(lab.pbx, udp=[5060])
    try:
        a = lab.client("a", ["203.0.113.66/24"])
        b = lab.client("b", ["203.0.113.67/24"])
        server.serve("# list v1\n203.0.113.66\n")
        bl_mod.add(core, "voipbl", server.url, refresh="1h", timeout=5)
        assert not a.udp_probe("203.0.113.1", 5060, timeout=0.3)
        assert b.udp_probe("203.0.113.1", 5060, timeout=0.5)

        # Same list: a conditional GET, 304, nothing re-applied.
        [res] = bl_mod.refresh(core, timeout=5)
        assert not res.changed and "not modified" in res.message and res.error is None
        assert server.requests[-1]["if-none-match"] == '"v1"'

        # A new version: taken, and the kernel follows.
        server.serve("203.0.113.67\n")
        [res] = bl_mod.refresh(core, timeout=5)
        assert res.changed and res.error is None
        assert a.udp_probe("203.0.113.1", 5060, timeout=0.5)
        assert not b.udp_probe("203.0.113.1", 5060, timeout=0.3)

        # Oversize: refused, the last copy stays in force.
        server.serve("203.0.113.66\n" * 200)
        [res] = bl_mod.refresh(core, timeout=5, max_bytes=1000)
        assert not res.changed and "over the limit" in (res.error or "")
        assert [str(n) for n in bl_mod.get(core.store, "voipbl").nets] == ["203.0.113.67/32"]
        assert not b.udp_probe("203.0.113.1", 5060, timeout=0.3)

        # The server goes away: the error is kept for `list`, so is the copy.
        server.close()
        [res] = bl_mod.refresh(core, timeout=2)
        assert not res.changed and "cannot fetch" in (res.error or "")
        stored = bl_mod.get(core.store, "voipbl")
        assert [str(n) for n in stored.nets] == ["203.0.113.67/32"] and stored.error == res.error
        core.apply()  # a full apply (boot, drift repair) still carries the last copy
        assert not b.udp_probe("203.0.113.1", 5060, timeout=0.3)
        assert a.udp_probe("203.0.113.1", 5060, timeout=0.5)
    finally:
        echo.close()


def test_an_oversize_list_is_never_added(lab: Lab, tmp_path: Path, server: ListServer) -> None:
    cfg = parse_config({"state_dir": str(tmp_path / "s"), "firewall": {"netns": lab.pbx.ns}})
    core = Core(cfg, protect=[])
    server.serve("203.0.113.66\n" * 200)
    with pytest.raises(ValidationError, match="over the limit"):
        bl_mod.add(core, "big", server.url, timeout=5, max_bytes=1000)
    assert bl_mod.lists(core.store) == []


def test_due_follows_the_refresh_interval(lab: Lab, tmp_path: Path, server: ListServer) -> None:
    from datetime import timedelta

    from tm4.core.model import utcnow

    t = [utcnow()]
    cfg = parse_config({"state_dir": str(tmp_path / "s"), "firewall": {"netns": lab.pbx.ns}})
    core = Core(cfg, protect=[], clock=lambda: t[0])
    server.serve("203.0.113.66\n")
    bl_mod.add(core, "voipbl", server.url, refresh="6h", timeout=5, apply=False)
    assert bl_mod.due(core, due_only=True) == []
    t[0] += timedelta(hours=6)
    assert [b.name for b in bl_mod.due(core, due_only=True)] == ["voipbl"]
