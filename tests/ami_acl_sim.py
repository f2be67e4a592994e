"""An AMI server as far as tm4's ACL upkeep uses it, built from the captures of a
real Asterisk 22.10.1 in tests/fixtures/ami_acl/ (see the README there).

- banner `Asterisk Call Manager/11.0.0`, CRLF lines, a blank line ends a message;
- Login answers exactly as captured (success; failure after a delay, then close);
- `Action: Command` answers are replayed byte for byte from the captures, with the
  request's ActionID; `acl show` / `acl show NAME` are produced in the captured
  Output-line framing from the ACLs the simulator loaded (Asterisk's CLI format:
  `\\nACL: NAME\\n----...\\n` then `%3d: %s - %s/%s` per rule);
- `Action: Reload` answers like manager.c's action_reload (`Message: Module
  Reloaded` / `No such module`) in the captured ack framing; `Module: acl` re-reads
  acl.conf (following #include) and `Module: manager` re-reads manager.conf users;
- permissions as manager.c checks them: Command needs write=command, Reload
  write=system or config; otherwise `Message: Permission denied`;
- Logoff answers Goodbye and closes;
- `ListCommands` answers with the list captured for tm4's least-privilege user
  (real2/ami/pjsip_show: write=system); for a user with write=command the `Command`
  line is added (SYNTHESIZED: its Priv as manager.c registers it, `command,all`);
- a refused Command raises the captured `RequestNotAllowed` security event
  (real2/ami/command_denied): recorded in `security_events`, and sent to the session
  when it logged in without `Events: off`.

It runs its own event loop on a thread so that synchronous tests (and code under
test calling asyncio.run) can talk to it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tm4.lab.sim.ami import FULLY_BOOTED, RELOAD_EVENT, address, event_tv, render_event

FIXTURES = Path(__file__).parent / "fixtures" / "ami_acl"
BANNER = b"Asterisk Call Manager/11.0.0\r\n"
CRLF = b"\r\n"


# -- the captures ---------------------------------------------------------------

@dataclass
class Block:
    direction: str  # "SENT" (client -> Asterisk) or "RECV"
    declared: int  # the byte count in the capture's header line
    data: bytes


def capture_blocks(path: Path) -> Iterator[Block]:
    """The `>>> SENT n bytes` / `<<< RECV n bytes` blocks of a readable capture,
    turned back into bytes (each `...\\r\\n` line ends in CRLF)."""
    cur: Block | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#### \S+ \S+ (>>> SENT|<<< RECV) (\d+) bytes", line)
        if m:
            if cur is not None:
                yield cur
            cur = Block("SENT" if "SENT" in m.group(1) else "RECV", int(m.group(2)), b"")
            continue
        if line.startswith("####"):
            if cur is not None:
                yield cur
            cur = None
            continue
        if cur is not None and line.endswith("\\r\\n"):
            cur.data += line[:-4].encode() + CRLF
    if cur is not None:
        yield cur


def captured_commands(*names: str) -> dict[str, bytes]:
    """Command text -> the captured answer, with its ActionID value replaced by {id}."""
    out: dict[str, bytes] = {}
    for name in names:
        pending: str | None = None
        for b in capture_blocks(FIXTURES / name):
            if b.direction == "SENT":
                m = re.search(rb"^Command: (.*)\r$", b.data, re.M)
                pending = m.group(1).decode() if m and b.data.startswith(b"Action: Command") else None
            elif pending is not None:
                out[pending] = re.sub(rb"^ActionID: .*\r$", b"ActionID: {id}\r", b.data, count=1, flags=re.M)
                pending = None
    return out


REPLAYED = captured_commands("ami_acl_commands.txt", "ami_cmd_test.txt")


def _real2_answer(capture: str, action_id: str) -> bytes:
    """The captured answer (bytes after the send) to the action sent with `action_id`."""
    import ami_capture

    conn = next(iter(ami_capture.load(capture).conns.values()))
    for sent, got in conn.turns():
        if ami_capture.action_of(sent).get("actionid") == action_id:
            return got
    raise KeyError(action_id)


LIST_COMMANDS = _real2_answer("pjsip_show", "listcmds")  # user tm4: write=system
# SYNTHESIZED: the line a user with write=command also gets (manager.c: EVENT_FLAG_COMMAND)
COMMAND_LINE = b"Command:  (Priv: command,all)\r\n"
_DENIED = _real2_answer("command_denied", "cmd-acl")  # Permission denied + RequestNotAllowed
DENIED_ANSWER, NOT_ALLOWED_EVENT = _DENIED.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n", _DENIED.split(b"\r\n\r\n", 1)[1]


# -- Asterisk's view of the config ------------------------------------------------

@dataclass
class User:
    secret: str
    read: set[str] = field(default_factory=lambda: {"system", "security"})
    write: set[str] = field(default_factory=lambda: {"system"})


def _conf_lines(path: Path, seen: set[Path] | None = None) -> Iterator[str]:
    """Lines of an Asterisk config file with #include expanded (relative to its dir)."""
    seen = seen or set()
    if path in seen or not path.exists():
        return
    seen.add(path)
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split(";", 1)[0].strip()
        m = re.match(r"#\s*(?:try)?include\s+[\"<]?([^\">]+)[\">]?", line)
        if m:
            inc = Path(m.group(1).strip())
            yield from _conf_lines(inc if inc.is_absolute() else path.parent / inc, seen)
        elif line:
            yield line


def load_sections(path: Path) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    cur: str | None = None
    for line in _conf_lines(path):
        m = re.fullmatch(r"\[([^\]]+)\].*", line)
        if m:
            cur = m.group(1)
            out.setdefault(cur, [])
        elif cur is not None and "=" in line:
            k, _, v = line.partition("=")
            out[cur].append((k.strip().lower(), v.lstrip(">").strip()))
    return out


def ha_rule(value: str) -> tuple[str, str]:
    """Like ast_append_ha: address and netmask as Asterisk stores (and prints) them."""
    addr, _, mask = value.partition("/")
    ip = ipaddress.ip_address(addr.strip())
    if not mask:
        bits = ip.max_prefixlen
    elif mask.strip().isdigit():
        bits = int(mask)
    else:
        bits = bin(int(ipaddress.ip_address(mask.strip()))).count("1")
    net = ipaddress.ip_network(f"{ip}/{bits}", strict=False)
    return str(net.network_address), str(net.netmask)


# -- the server -----------------------------------------------------------------

class AmiAclSim:
    def __init__(self, config_dir: Path | None = None, users: dict[str, User] | None = None,
                 fail_delay: float = 0.05):
        self.config_dir = config_dir
        self.users: dict[str, User] = dict(users or {})
        self.fail_delay = fail_delay  # Asterisk waits 1 s; tests need not
        self.acls: dict[str, list[tuple[str, str, str]]] = {}
        self.transcript: list[tuple[str, bytes]] = []  # ("in" | "out", one message)
        self.reloads: list[str] = []
        self.security_events: list[bytes] = []  # what Asterisk raised (RequestNotAllowed)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._static_users = dict(self.users)
        self.reload_acl()
        self.reload_manager()

    # -- config -----------------------------------------------------------------
    def reload_acl(self) -> None:
        self.acls = {}
        if self.config_dir is None:
            return
        for name, items in load_sections(self.config_dir / "acl.conf").items():
            rules = [("allow" if k == "permit" else "deny", *ha_rule(v)) for k, v in items
                     if k in ("permit", "deny")]
            self.acls[name] = rules

    def reload_manager(self) -> None:
        users = dict(self._static_users)
        if self.config_dir is not None and (self.config_dir / "manager.conf").exists():
            for name, items in load_sections(self.config_dir / "manager.conf").items():
                if name == "general":
                    continue
                d: dict[str, str] = {}
                for k, v in items:
                    d[k] = v
                if "secret" in d:
                    users[name] = User(d["secret"], set(d.get("read", "").split(",")),
                                       set(d.get("write", "").split(",")))
        self.users = users

    # -- lifecycle --------------------------------------------------------------
    def start(self, port: int = 0) -> AmiAclSim:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(
                asyncio.start_server(self._session, "127.0.0.1", port or self.port or 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(5):
            raise RuntimeError("AMI simulator did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop = None
        self._thread = None

    def __enter__(self) -> AmiAclSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sent_by_client(self) -> list[bytes]:
        return [m for d, m in self.transcript if d == "in"]

    # -- one connection ---------------------------------------------------------
    async def _send(self, w: asyncio.StreamWriter, data: bytes) -> None:
        self.transcript.append(("out", data))
        w.write(data)
        await w.drain()

    async def _session(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        user: User | None = None
        events = True
        try:
            await self._send(w, BANNER)
            while True:
                raw = await self._read(r)
                if raw is None:
                    return
                self.transcript.append(("in", raw))
                hdr = {k.lower(): v for k, v in _fields(raw)}
                action = hdr.get("action", "").lower()
                aid = hdr.get("actionid", "")
                if action == "login":
                    u = self.users.get(hdr.get("username", ""))
                    if u is None or u.secret != hdr.get("secret"):
                        await asyncio.sleep(self.fail_delay)
                        await self._send(w, _reply("Error", aid, "Authentication failed"))
                        return
                    user = u
                    events = hdr.get("events", "on").lower() != "off"
                    await self._send(w, _reply("Success", aid, "Authentication accepted"))
                    if events:  # as real2/ami/command_denied shows for tm4's user
                        peer = w.get_extra_info("peername")
                        if {"system", "all"} & u.read:
                            await self._send(w, FULLY_BOOTED)
                        if {"security", "all"} & u.read:
                            await self._send(w, render_event(
                                "SuccessfulAuth", Service="AMI", AccountID=hdr.get("username", ""),
                                SessionID="0x7f7920014950", LocalAddress=address("127.0.0.1", self.port, "TCP"),
                                RemoteAddress=address(peer[0], peer[1], "TCP"), UsingPassword="0",
                                SessionTV=event_tv()))
                elif action == "logoff":
                    await self._send(w, _reply("Goodbye", aid, "Thanks for all the fish."))
                    return
                elif user is None:
                    await self._send(w, _reply("Error", aid, "Missing authentication"))
                elif action == "reload":
                    if not {"system", "config", "all"} & user.write:
                        await self._send(w, _reply("Error", aid, "Permission denied"))
                        continue
                    answer = self._reload(hdr.get("module", ""), aid)
                    if events and answer.startswith(b"Response: Success") and {"system", "all"} & user.read:
                        answer += RELOAD_EVENT % hdr.get("module", "").encode()
                    await self._send(w, answer)
                elif action == "listcommands":
                    listed = LIST_COMMANDS.replace(b"ActionID: listcmds\r\n", f"ActionID: {aid}\r\n".encode())
                    if {"command", "all"} & user.write:
                        at = listed.index(b"CoreSettings:")
                        listed = listed[:at] + COMMAND_LINE + listed[at:]
                    await self._send(w, listed)
                elif action == "command":
                    if not {"command", "all"} & user.write:
                        await self._send(w, DENIED_ANSWER.replace(b"ActionID: cmd-acl\r\n",
                                                                  f"ActionID: {aid}\r\n".encode()))
                        self.security_events.append(NOT_ALLOWED_EVENT)
                        if events:
                            await self._send(w, NOT_ALLOWED_EVENT)
                        continue
                    await self._send(w, self._command(hdr.get("command", ""), aid))
                else:
                    await self._send(w, _reply("Error", aid, "Invalid/unknown command"))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            w.close()

    async def _read(self, r: asyncio.StreamReader) -> bytes | None:
        data = b""
        while True:
            line = await r.readline()
            if not line:
                return None
            if line == CRLF:
                if data:
                    return data + CRLF
                continue
            data += line

    def _reload(self, module: str, aid: str) -> bytes:
        known = {"acl": self.reload_acl, "manager": self.reload_manager,
                 "res_pjsip.so": lambda: None, "res_pjsip_acl.so": None}
        if module not in known:
            return _reply("Error", aid, "No such module")
        fn = known[module]
        if fn is None:
            return _reply("Error", aid, "Module does not support reload")
        fn()
        self.reloads.append(module)
        return _reply("Success", aid, "Module Reloaded")

    def _command(self, command: str, aid: str) -> bytes:
        if command == "module reload acl":
            self.reload_acl()
            self.reloads.append("acl")
        if command == "manager reload":
            self.reload_manager()
            self.reloads.append("manager")
        m = re.fullmatch(r"acl show(?: (\S+))?", command)
        if m:
            return _output(aid, self._acl_show(m.group(1)))
        if command in REPLAYED:
            return REPLAYED[command].replace(b"{id}", aid.encode())
        return (f"Response: Error\r\nActionID: {aid}\r\nMessage: Command output follows\r\n"
                f"Output: No such command '{command}' (type 'core show help {command}' for other "
                f"possible commands)\r\n\r\n").encode()

    def _acl_show(self, name: str | None) -> str:
        if name is None:
            return "\nacl\n---\n" + "".join(f"{n}\n" for n in self.acls)
        if name not in self.acls:
            return f"\nCould not find ACL named '{name}'\n"
        out = f"\nACL: {name}\n---------------------------------------------\n"
        for i, (sense, addr, mask) in enumerate(self.acls[name]):
            out += f"{i:3d}: {'allow' if sense == 'allow' else ' deny'} - {addr}/{mask}\n"
        return out


def _fields(raw: bytes) -> list[tuple[str, str]]:
    out = []
    for line in raw.decode().split("\r\n"):
        k, sep, v = line.partition(": ")
        if sep:
            out.append((k, v))
    return out


def _reply(response: str, aid: str, message: str) -> bytes:
    """astman_send_response_full: Response, ActionID, Message, blank line."""
    return f"Response: {response}\r\nActionID: {aid}\r\nMessage: {message}\r\n\r\n".encode()


def _output(aid: str, text: str) -> bytes:
    """A successful Command answer: one Output line per line of CLI output."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    body = "".join(f"Output: {ln}\r\n" for ln in lines)
    return (f"Response: Success\r\nActionID: {aid}\r\nMessage: Command output follows\r\n"
            f"{body}\r\n").encode()
