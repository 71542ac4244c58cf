"""What every command shares: the consoles and the --config option."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

out = Console(soft_wrap=True)
if not out.is_terminal:
    out.width = 200
# Messages quote what the user wrote (a pattern like [a-z0-9], a URL, a file name): printed as
# they are, never read as markup or emoji codes. Style them with rich.text.Text.
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)

config_option = click.option(
    "--config",
    "-c",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Config file (default: the shipped config/tunnelwatch.toml).",
)
