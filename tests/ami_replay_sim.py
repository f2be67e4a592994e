"""An AMI server that answers exactly as the real Asterisk 22 did in the real2 captures
(tests/fixtures/asterisk-22/real2/ami/): each action is looked up among the actions the
capture's client sent (by its fields, ActionID aside) and answered with the bytes Asterisk
sent back after it, the ActionID replaced by the client's, interleaved events and all.

A Login with `Events: off` (not in these captures; manager.c's event mask) is answered
the same, and the session then gets no event that is not an answer (no ActionID).

Several captures of the same user can be merged (pjsip_show + command_denied: the tm4
manager user, read=system,security, write=system). What no capture shows is not made up:
the action is recorded in `uncaptured` and answered with nothing, so a test that sends it
fails. `actions` records every action received, for the least-privilege checks.

Runs its own event loop on a thread, so blocking code (`asyncio.run` inside the code under
test) can talk to it: `with ReplaySim(["pjsip_show"]) as sim: ... sim.port`.
"""

from __future__ import annotations

import asyncio
import re
import threading

import ami_capture

_IGNORED = {"actionid", "secret", "events"}


def signature(action: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v.lower() if k == "action" else v) for k, v in action.items() if k not in _IGNORED))


def listed_actions(answer: bytes) -> dict[str, set[str]]:
    """A captured ListCommands answer: action -> its privilege classes (`<none>`: none)."""
    out: dict[str, set[str]] = {}
    for m in re.finditer(rb"^([A-Za-z0-9]+): .*\(Priv: ([^)]*)\)\r$", answer, re.M):
        privs = m.group(2).decode()
        out[m.group(1).decode()] = set() if privs == "<none>" else set(privs.split(",")) - {"all"}
    return out


class ReplaySim:
    def __init__(self, captures: list[str], *, conn: str | None = None,
                 described_endpoints_only: bool = False) -> None:
        self.banner = b""
        self.secret = ""
        self.username = ""
        self.answers: dict[tuple[tuple[str, str], ...], tuple[str, bytes]] = {}
        for name in captures:
            cap = ami_capture.load(name)
            c = cap.conns[conn] if conn else next(iter(cap.conns.values()))
            turns = c.turns()
            self.banner = self.banner or turns[0][1]
            for sent, got in turns[1:]:
                action = ami_capture.action_of(sent)
                if action.get("action", "").lower() == "login":
                    self.username, self.secret = action.get("username", ""), action.get("secret", "")
                self.answers.setdefault(signature(action), (action.get("actionid", ""), got))
        if described_endpoints_only:
            self._trim_endpoint_list()
        self.actions: list[dict[str, str]] = []
        self.uncaptured: list[dict[str, str]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _trim_endpoint_list(self) -> None:
        """pjsip_show asked PJSIPShowEndpoint for 1001 and prov-a/b/c only, not for 1002 and
        anonymous: leave those two out of the PJSIPShowEndpoints answer (ListItems counted
        again) rather than make their details up."""
        key = signature({"action": "pjsipshowendpoints"})
        captured_id, answer = self.answers[key]
        described = {v for sig in self.answers for k, v in sig if k == "endpoint"}
        kept, items = [], 0
        for m in ami_capture.messages(answer):
            name = re.search(rb"\r\nObjectName: ([^\r]*)\r\n", m)
            if m.startswith(b"Event: EndpointList\r\n") and name:
                if name.group(1).decode() not in described:
                    continue
                items += 1
            if m.startswith(b"Event: EndpointListComplete\r\n"):
                m = re.sub(rb"ListItems: \d+", b"ListItems: %d" % items, m)
            kept.append(m)
        self.answers[key] = (captured_id, b"".join(kept))

    def allowed(self) -> dict[str, set[str]]:
        """What the captured user may send (its ListCommands answer)."""
        got = self.answers.get(signature({"action": "listcommands"}))
        return listed_actions(got[1]) if got else {}

    def __enter__(self) -> ReplaySim:
        self._thread.start()
        if not self._ready.wait(30):  # a loaded machine may be slow; never hand out port 0
            raise RuntimeError("the AMI simulator did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(asyncio.start_server(self._session, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        pending = asyncio.all_tasks(loop)
        for t in pending:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.banner)
        events_off = False
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                action = ami_capture.action_of(raw)
                self.actions.append(action)
                if action.get("action", "").lower() == "login" and (
                        action.get("username") != self.username or action.get("secret") != self.secret):
                    self.uncaptured.append(action)  # no capture of a bad login here
                    return
                found = self.answers.get(signature(action))
                if found is None:
                    self.uncaptured.append(action)
                    continue
                captured_id, answer = found
                if action.get("action", "").lower() == "login":
                    events_off = action.get("events", "").lower() == "off"
                if events_off:
                    answer = b"".join(m for m in ami_capture.messages(answer)
                                      if not m.startswith(b"Event: ") or b"\r\nActionID: " in m)
                new_id = action.get("actionid", "")
                if captured_id:
                    answer = answer.replace(b"ActionID: " + captured_id.encode() + b"\r\n",
                                            b"ActionID: " + new_id.encode() + b"\r\n")
                writer.write(answer)
                await writer.drain()
                if action.get("action", "").lower() == "logoff":
                    return
        finally:
            writer.close()
