"""How `tm4` fails: a wrong command line is one line on stderr and exit 2, a refused or failed
operation one line and exit 1; whatever the arguments, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tm4.cli import cli
from tm4.core.errors import Tm4Error

TM4 = str(Path(sys.executable).parent / "tm4")


def run(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TM4_NFT_SUBPROCESS": "1"}
    pre = ["--config", str(config)] if config else []
    return subprocess.run([TM4, *pre, *args], capture_output=True, text=True, timeout=60, env=env, cwd="/")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A store of its own, and a namespace that does not exist: nothing reaches a kernel."""
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tmp / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp}/state"\n[firewall]\nnetns = "tm4-test-none"\n'
                   f'[daemon]\nsocket = "{tmp}/tm4.sock"\n')
    old = os.environ.get("TM4_NFT_SUBPROCESS")
    os.environ["TM4_NFT_SUBPROCESS"] = "1"
    yield cfg
    if old is None:
        os.environ.pop("TM4_NFT_SUBPROCESS", None)
    else:
        os.environ["TM4_NFT_SUBPROCESS"] = old


@pytest.mark.parametrize("args, line", [
    (["nosuch"], "tm4: No such command 'nosuch'. (see `tm4 --help`)"),
    (["add"], "tm4 add: Missing argument 'NAME'. (see `tm4 add --help`)"),
    (["bans", "--ttl", "1h"], "tm4 bans: No such option '--ttl'. (see `tm4 bans --help`)"),
    (["block", "192.0.2.9", "--ttl", "soon"],
     "tm4 block: Invalid value for '--ttl': not a duration: 'soon' (use e.g. 90s, 15m, 2h, 1d, 1w) "
     "(see `tm4 block --help`)"),
    (["log", "-n", "x\x1b[2J"], "tm4 log: Invalid value for '-n': 'x\\x1b[2J' is not a valid integer. "
                                "(see `tm4 log --help`)"),
])
def test_a_usage_error_is_one_line_and_exit_2(config: Path, args: list[str], line: str) -> None:
    res = run(*args, config=config)
    assert (res.returncode, res.stdout, res.stderr) == (2, "", line + "\n")


def test_a_refusal_is_one_line_and_exit_1(config: Path) -> None:
    res = run("block", "224.0.0.1", config=config)
    assert res.returncode == 1 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("tm4: ")
    res = run("show", "nobody", config=config)
    assert res.returncode == 1 and res.stderr.startswith("tm4: ") and len(res.stderr.splitlines()) == 1


def test_help_and_version_exit_0(config: Path) -> None:
    assert run("--version").returncode == 0
    res = run("add", "--help", config=config)
    assert res.returncode == 0 and res.stdout.startswith("Usage: tm4 add")


# The verbs that only read or change tm4's own store here (no daemon to run, nothing
# installed on the machine, no network): positionals, and options with what they take.
NAMES = ["office", "dialin-alice", "a" * 300, "", "-x", "Büro", "x\ny", "\x1b[2J", "'; DROP TABLE entries;--"]
ADDRS = ["192.0.2.7", "198.51.100.0/24", "0.0.0.0/0", "224.0.0.1", "255.255.255.255", "ff02::1", "::", "::1",
         "2001:db8::1", "2001:db8::/32", "192.0.2.300", "192.0.2.7/33", "[2001:db8::1]", "pbx.example.com",
         "*.example.com", "localhost", "1e10", "", "192.0.2.1\n198.51.100.1"]
TEXT = ["", "x\ny", "\r", "\x1b[2J", "%s%n", "a" * 2000, "café", "\x00"]
TTLS = ["1h", "-5m", "0s", "1001d", "90", "soon", "", "1h30m", "\n"]
SERVICES = ["ssh", "sip-udp", "0", "1 3", "9", "10", "all", "nope", "", "SIP-UDP", "1,2"]
INTS = ["0", "1", "50", "-1", "10001", "99999999999999999999", "x", ""]
VERBS: dict[tuple[str, ...], tuple[int, list[str], dict[str, list[str] | None]]] = {
    ("add",): (3, NAMES + ADDRS, {"-s": SERVICES, "--ttl": TTLS, "--note": TEXT, "--replace": None,
                                  "--force": None, "--endpoint": NAMES, "--zone": ["trusted", "nope", ""]}),
    ("block",): (1, ADDRS, {"--ttl": TTLS, "--reason": TEXT, "--force": None}),
    ("unblock",): (1, ADDRS, {}),
    ("del",): (1, NAMES, {"--force": None}),
    ("show",): (1, NAMES, {"--json": None}),
    ("log",): (0, [], {"-n": INTS, "--subject": NAMES + ADDRS, "--json": None}),
    ("add-ip",): (3, NAMES + ADDRS + SERVICES, {}),
    ("add-fqdn",): (3, NAMES + ADDRS + SERVICES, {}),
    ("del-acct",): (1, NAMES, {}),
    ("passcode", "add"): (1, NAMES, {"-s": SERVICES, "--ttl": TTLS, "--keep": INTS, "--length": INTS,
                                     "--endpoint": NAMES, "--json": None}),
    ("passcode", "del"): (1, NAMES, {"--keep-grant": None}),
    ("passcode", "list"): (0, [], {"--json": None}),
    ("bans",): (0, [], {"--json": None}),
    ("list",): (0, [], {"--json": None}),
    ("sweep",): (0, [], {}),
    ("status",): (0, [], {"--json": None}),
    ("plan",): (0, [], {"--json": None}),
    ("knock", "show"): (0, [], {"--json": None, "--host": NAMES + ADDRS}),
    ("quarantine", "list"): (0, [], {"--json": None}),
    ("safe-mode",): (0, [], {"--json": None}),
    ("nosuch",): (1, NAMES, {"--json": None}),
}


@st.composite
def argvs(draw: st.DrawFn) -> list[str]:
    """Mostly well-formed command lines with hostile values, sometimes broken ones."""
    verb = draw(st.sampled_from(sorted(VERBS)))
    most, pool, options = VERBS[verb]
    args = list(verb) + draw(st.lists(st.sampled_from(pool) if pool else st.nothing(), max_size=most))
    for opt in draw(st.lists(st.sampled_from(sorted(options)), max_size=3)) if options else []:
        values = options[opt]
        args += [opt] if values is None else [opt, draw(st.sampled_from(values))]
    if draw(st.integers(0, 9)) == 0:  # a stray word, or an option the verb does not have
        args.insert(draw(st.integers(0, len(args))), draw(st.sampled_from(["--ttl", "--bogus", "-", "--", "x"])
                                                          | st.text(max_size=6)))
    return args


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argvs())
def test_no_argument_list_ends_in_a_traceback(config: Path, argv: list[str]) -> None:
    res = CliRunner().invoke(cli, ["--config", str(config), *argv], input="\n")
    exc = res.exception
    if exc is None or isinstance(exc, Tm4Error):  # main() prints a Tm4Error as one line, exit 1
        return
    assert isinstance(exc, SystemExit), f"{argv!r}: {exc!r}"
    assert res.exit_code in (0, 1, 2), res.output
    if res.exit_code == 2 and not res.stderr.startswith("Usage:"):  # a bare group shows its help
        assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.output
