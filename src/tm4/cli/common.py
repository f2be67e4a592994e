"""What every command shares: the config, the core, JSON output, one-line errors."""

from __future__ import annotations

import json
import os
from functools import cached_property
from typing import Any

import click

from ..config import Config, load_config
from ..core import Core
from ..durations import parse_duration
from ..errors import ValidationError


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

    @property
    def actor(self) -> str:
        """Who is acting, for the audit trail: uid, and the sudo user if any."""
        who = f"uid={os.getuid()}"
        if os.environ.get("SUDO_USER"):
            who += f" sudo={os.environ['SUDO_USER']}"
        return who


pass_ctx = click.make_pass_decorator(Ctx)

json_option = click.option("--json", "as_json", is_flag=True, help="print JSON")


def ttl_option(help_text: str = "lifetime, e.g. 2h, 1d (default: permanent)") -> Any:
    return click.option("--ttl", callback=_ttl_cb, default=None, help=help_text)


def _ttl_cb(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValidationError as exc:
        raise click.BadParameter(str(exc)) from None


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))
