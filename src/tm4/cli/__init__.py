"""tm4's command line. Each module in this package adds its commands with `register(group)`.

May import every package: it is the top layer, with tm4.lab below it.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Any

import click

from tm4.cli.common import Ctx
from tm4.core.errors import Tm4Error
from tm4.core.text import escape_control, install_log_escaping


class Tm4Group(click.Group):
    """The `tm4` group: a usage error is one line on stderr (exit 2), not click's three.

    Exit codes: 0 done; 1 refused or failed (a Tm4Error, one line: see `main`); 2 the
    command line itself is wrong (unknown verb or option, a bad or missing value)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # `tm4 zones`: the group's help is the answer
            click.echo(exc.format_message(), err=True)
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            click.echo(usage_line(exc), err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:  # e.g. a file option that cannot be opened
            click.echo(escape_control(f"tm4: {exc.format_message()}"), err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("tm4: aborted", err=True)
            sys.exit(1)
        # non-standalone click returns an explicit ctx.exit(code) as an int; commands return None
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def usage_line(exc: click.UsageError) -> str:
    """"tm4 add: Missing argument 'NAME'. (see `tm4 add --help`)": one line, control characters
    of the argument escaped."""
    where = exc.ctx.command_path if exc.ctx is not None else "tm4"
    return escape_control(f"{where}: {exc.format_message()} (see `{where} --help`)")


@click.group(cls=Tm4Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="TM4_CONFIG", metavar="PATH",
              help="config file (default /etc/tm4/tm4.toml)")
@click.version_option(package_name="tm4")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """tm4: keeps an Asterisk server invisible to all but its users and providers."""
    install_log_escaping()  # AMI, DNS and admin text never forges a log line
    ctx.obj = Ctx(config_path)


def _register_all() -> None:
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name in ("common", "__main__"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(cli)


_register_all()


def main() -> None:
    try:
        cli.main(prog_name="tm4")
    except Tm4Error as exc:
        click.echo(escape_control(f"tm4: {exc}"), err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
