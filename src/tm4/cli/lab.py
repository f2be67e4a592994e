"""`tm4 lab`: the quick start — tm4 at work in network namespaces, with measured times."""

from __future__ import annotations

import sys

import click


@click.command("lab")
@click.option("--keep", is_flag=True, help="keep the lab's files (config, logs, store) for a look afterwards")
@click.option("--asterisk", "asterisk", default=None, metavar="PATH",
              help="run this real Asterisk binary in the pbx namespace instead of the simulators")
@click.option("--asterisk-modules", default=None, metavar="DIR",
              help="its modules directory, if not the one it was built for")
@click.option("--json", "as_json", is_flag=True, help="print the timeline as JSON at the end")
def lab(keep: bool, asterisk: str | None, asterisk_modules: str | None, as_json: bool) -> None:
    """Build pbx/phone/attacker/dns namespaces, run tm4d in pbx, attack it, dial in, move a DDNS name."""
    from tm4.lab.story import run_lab
    from tm4.lab.timeline import steps_json, summary

    click.echo("tm4 lab: everything below happens in private network namespaces on this machine")
    try:
        steps = run_lab(lambda line: click.echo(line), keep=keep, asterisk=asterisk,
                        asterisk_modules=asterisk_modules)
    except KeyboardInterrupt:
        click.echo("tm4 lab: interrupted; cleaned up", err=True)
        sys.exit(130)
    text, rc = summary(steps)
    click.echo(f"tm4 lab: {text}")
    if as_json:
        click.echo(steps_json(steps))
    sys.exit(rc)


def register(cli: click.Group) -> None:
    cli.add_command(lab)
