"""tm4's command line. Each module in this package adds its commands with `register(group)`.

May import every package: it is the top layer, with tm4.lab below it.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from tm4.cli.common import Ctx
from tm4.core.errors import Tm4Error


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="TM4_CONFIG", metavar="PATH",
              help="config file (default /etc/tm4/tm4.toml)")
@click.version_option(package_name="tm4")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """tm4: keeps an Asterisk server invisible to all but its users and providers."""
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
        cli.main(standalone_mode=False)
    except Tm4Error as exc:
        click.echo(f"tm4: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("tm4: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
