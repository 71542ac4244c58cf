"""What every command shares: the consoles, the --config option and the group that loads a
command's module only when that command runs.

A command line that starts at once imports little: `tunnelwatch --help` reads no command's
module, and the consoles (rich) are made when a command first prints.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console

config_option = click.option(
    "--config",
    "-c",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Config file (default: the shipped config/tunnelwatch.toml).",
)


@cache
def _consoles() -> tuple[Console, Console]:
    from rich.console import Console

    out = Console(soft_wrap=True)
    if not out.is_terminal:
        out.width = 200
    # Messages quote what the user wrote (a pattern like [a-z0-9], a URL, a file name): printed as
    # they are, never read as markup or emoji codes. Style them with rich.text.Text.
    err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)
    return out, err


def __getattr__(name: str) -> Console:
    """`out` (standard output) and `err` (standard error), made on first use."""
    if name == "out":
        return _consoles()[0]
    if name == "err":
        return _consoles()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LazyGroup(click.Group):
    """A group whose commands are named by "module:attribute" and imported when one of them
    runs or its help is asked for. The group's own help lists them by the short help given
    beside each name, so listing them imports nothing (tests/test_cli.py checks that each
    short help is the command's own)."""

    def __init__(self, *args: Any, lazy: Mapping[str, tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})  # name -> ("module:attribute", short help)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return super().get_command(ctx, name)
        module, attribute = self.lazy[name][0].split(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.lazy[name][0]} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # What click.Group.format_commands writes, with a stand-in for each lazy command: a
        # command holding its short help, shortened as click shortens a command's own.
        listed = {name: command for name, command in self.commands.items() if not command.hidden}
        listed |= {name: click.Command(name, help=help) for name, (_, help) in self.lazy.items()}
        if not listed:
            return
        limit = formatter.width - 6 - max(map(len, listed))
        with formatter.section("Commands"):
            formatter.write_dl([(name, listed[name].get_short_help_str(limit)) for name in sorted(listed)])
