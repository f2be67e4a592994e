"""What every command shares: the config, the core, JSON output, one-line errors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import click

from tm4.core.config import Config, load_config
from tm4.core.durations import parse_duration
from tm4.core.errors import ValidationError
from tm4.core.text import escape_control
from tm4.ops.engine import Core


class Ctx:
    """Lazily built per-invocation state: commands that need no store never open one."""

    def __init__(self, config_path: str | None):
        self.config_path = config_path

    @cached_property
    def config(self) -> Config:
        return load_config(self.config_path)

    @cached_property
    def core(self) -> Core:
        return Core(self.config)

    def call(self, op: str, args: dict[str, Any]) -> Any:
        """Run a root operation through tm4d when it runs, else directly (root only):
        the same function either way (tm4.ops.root), so the results are the same."""
        args = {**args, "actor": self.actor}

        def local_core() -> Core:
            core = self.core
            if args.get("force"):
                core._protect = []
            return core

        return invoke(self.config.daemon.socket, op, args, local_core)

    @property
    def actor(self) -> str:
        """Who is acting, for the audit trail: uid, and the sudo user if any."""
        who = f"uid={os.getuid()}"
        if os.environ.get("SUDO_USER"):
            who += f" sudo={os.environ['SUDO_USER']}"
        return who


pass_ctx = click.make_pass_decorator(Ctx)

json_option = click.option("--json", "as_json", is_flag=True, help="print JSON")


def ttl_option(help_text: str = "lifetime, e.g. 2h, 1d (default: permanent)", *, as_text: bool = False) -> Any:
    """--ttl, checked at parse time; a timedelta, or the checked text (`as_text`) for
    operations that travel over the control socket."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            parsed = parse_duration(value)
        except ValidationError as exc:
            raise click.BadParameter(str(exc)) from None
        return value if as_text else parsed

    return click.option("--ttl", callback=check, default=None, help=help_text)


def echo_line(text: str) -> None:
    """One line of human output built from stored or outside text (a ban reason from AMI, an
    admin's note, a DNS name): its control characters escaped, so it stays one line and
    cannot repaint the terminal. (--json output is escaped by JSON itself.)"""
    click.echo(escape_control(text))


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def invoke(socket_path: str | Path, op: str, args: dict[str, Any],
           local_core: Callable[[], Core]) -> Any:
    """Through tm4d when it runs, else in this process (root only): the root operations
    (tm4.ops.root) and the dial-in ones (tm4.dialin.ops), the same functions tm4d runs."""
    from tm4.dialin.ops import DIALIN_OPS
    from tm4.ops.control import invoke as through_socket_or_here
    from tm4.ops.root import run_local

    return through_socket_or_here(
        socket_path, op, args, lambda o, a: run_local(local_core(), o, a, DIALIN_OPS))
