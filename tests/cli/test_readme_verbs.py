"""The README stays true: every verb the CLI has is named there (`tm4 VERB ...`)."""

from __future__ import annotations

from pathlib import Path

import click

from tm4.cli import cli

README = Path(__file__).resolve().parent.parent.parent / "README.md"


def verbs(cmd: click.Command, prefix: tuple[str, ...] = ()) -> list[str]:
    if isinstance(cmd, click.Group):
        return [v for name, sub in cmd.commands.items() for v in verbs(sub, (*prefix, name))]
    return [" ".join(prefix)]


def test_every_cli_verb_is_in_the_readme() -> None:
    text = README.read_text()
    found = verbs(cli)
    assert len(found) > 40  # the walk itself works (56 verbs when written)
    missing = [v for v in found if f"tm4 {v}" not in text]
    assert not missing, f"verbs the README does not name: {missing}"
