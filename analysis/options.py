"""What the analysis commands share: their options and argument types, the config with
--store and --vantage applied, and the output of rows as a table, CSV or JSON lines.

Nothing here loads pandas: `events list` and the command line's help run without it. A
value that came from a DataFrame (a timestamp, a numpy number) is formatted with pandas,
loaded by then.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from probe.config import Config, load_config
from probe.console import config_option
from probe.errors import ConfigError
from probe.pgurl import POSTGRES_SCHEMES, postgres_url_problem, redact

from .events import CATEGORIES, Event, load_events

if TYPE_CHECKING:
    import pandas as pd

F = TypeVar("F", bound=Callable[..., Any])
DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(d|h|min|m|s)$")
FORMATS = click.Choice(["table", "csv", "json"])
# The years pandas' nanosecond timestamps hold whole (pd.Timestamp.min.year + 1 to max.year - 1;
# tests/test_analysis_cli.py checks they agree): the analysis cannot reach outside them.
FIRST_YEAR, LAST_YEAR = 1678, 2261


class When(click.ParamType[datetime]):
    """A date (midnight UTC) or an ISO 8601 date and time (UTC unless it has an offset)."""

    name = "date"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not a date; use 2018-03-31 or 2018-03-31T08:00+08:00", param, ctx)
        if not FIRST_YEAR <= moment.year <= LAST_YEAR:
            self.fail(f"{value!r}: the year must be {FIRST_YEAR} to {LAST_YEAR}", param, ctx)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Duration(click.ParamType["pd.Timedelta"]):
    """3d, 12h, 90min, 30s or 0."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> pd.Timedelta:
        import pandas as pd

        if isinstance(value, pd.Timedelta):
            return value
        match = DURATION.match(str(value).strip())
        if str(value).strip() == "0":
            return pd.Timedelta(0)
        if not match:
            self.fail(f"{value!r} is not a duration; use e.g. 3d, 12h, 90min or 0", param, ctx)
        number, unit = float(match.group(1)), match.group(2)
        if unit == "d":
            return pd.Timedelta(days=number)
        if unit == "h":
            return pd.Timedelta(hours=number)
        return pd.Timedelta(minutes=number) if unit in ("min", "m") else pd.Timedelta(seconds=number)


def apply(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several option decorators as one, in the order they would be written above a command."""

    def decorate(command: F) -> F:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


def duration_option(name: str, default: str, help: str, show_default: bool = True) -> Callable[[F], F]:
    return click.option(name, type=Duration(), default=default, show_default=show_default, help=help)


format_option = click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)


def events_option(help: str = "More events (TOML or .ics).") -> Callable[[F], F]:
    return click.option(
        "--events", "event_files", multiple=True, type=click.Path(path_type=Path, dir_okay=False), help=help
    )


def category_option(help: str = f"Only this category: {', '.join(CATEGORIES)}.") -> Callable[[F], F]:
    return click.option("--category", "categories", multiple=True, help=help)


def since_until(
    since: str = "Only data from this date.", until: str = "Only data up to this date."
) -> Callable[[F], F]:
    return apply(click.option("--since", type=When(), help=since), click.option("--until", type=When(), help=until))


def paths_targets(path: str, target: str) -> Callable[[F], F]:
    return apply(
        click.option("--path", "-p", "paths", multiple=True, help=path),
        click.option("--target", "-t", "targets", multiple=True, help=target),
    )


def series_options(help: str) -> Callable[[F], F]:
    """--series FILE.csv --column NAME: an external series instead of the store's outages."""
    return apply(
        click.option("--series", type=click.Path(path_type=Path, dir_okay=False), help=help),
        click.option("--column", help="The series' value column (with --series)."),
    )


def missing_option(help: str) -> Callable[[F], F]:
    return click.option("--missing", type=float, multiple=True, help=help)


def store_options(command: F) -> F:
    """--store and --vantage: what to analyse, instead of the config's own store; and --config."""
    return apply(
        click.option(
            "--store",
            "store",
            help="A store to analyse instead of store.path: a SQLite file or the fleet's postgresql:// URL.",
        ),
        click.option("--vantage", help="The vantage point to analyse, of a store that holds several."),
        config_option,
    )(command)


def check_range(since: datetime | None, until: datetime | None) -> None:
    if since and until and since >= until:
        raise click.BadParameter(f"--since {since.isoformat()} is not before --until {until.isoformat()}")


def check_series(series: Path | None, column: str | None) -> None:
    if (series is None) != (column is None):
        raise click.BadParameter("--series and --column go together")


def checked_store(store: str) -> str:
    """--store, refused (quoting it without its password) when libpq would misread the URL:
    its parse errors quote the password."""
    if store.startswith(POSTGRES_SCHEMES) and (problem := postgres_url_problem(store)):
        raise ConfigError(f"--store: {problem} (got {redact(store)!r})")
    return store


def configured(config: Path | None, store: str | None = None, vantage: str | None = None) -> Config:
    """The config, analysing --store and --vantage when they are given."""
    from pydantic import SecretStr

    cfg = load_config(config)
    changes: dict[str, Any] = {}
    if store:
        changes["store"] = SecretStr(checked_store(store))
    if vantage:
        changes["vantage"] = vantage
    return cfg.model_copy(update={"analysis": cfg.analysis.model_copy(update=changes)}) if changes else cfg


def events_of(cfg: Config, extra: Sequence[Path] = ()) -> list[Event]:
    """The shipped calendar, the config's event files and `extra`."""
    return load_events([*cfg.analysis.events, *extra])


def emit(rows: Sequence[dict[str, Any]], columns: list[str], fmt: str, title: str) -> None:
    """Rows on standard output: a table titled `title`, CSV with a header, or JSON lines."""
    if fmt == "json":
        for row in rows:
            sys.stdout.write(json.dumps({c: _jsonable(row.get(c)) for c in columns}) + "\n")
    elif fmt == "csv":
        import pandas as pd

        frame = pd.DataFrame([{c: _jsonable(row.get(c)) for c in columns} for row in rows], columns=columns)
        frame.to_csv(sys.stdout, index=False)
    else:
        from rich.text import Text

        from probe.console import out
        from probe.tables import Cell, table

        # Text and cells: what users wrote (titles, file names) is never markup.
        grid = table(Text(title), [column.replace("_", " ") for column in columns])
        for row in rows:
            grid.add_row(*(Cell(_cell(row.get(c))) for c in columns))
        out.print(grid)


def _cell(value: Any) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.3g}"
    if isinstance(value, int):
        return str(value)
    import pandas as pd  # a value from a DataFrame: pandas is loaded

    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M")
    return "" if pd.isna(value) else str(value)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float):
        return None if math.isnan(value) else value
    import pandas as pd  # a value from a DataFrame: pandas is loaded

    return value.isoformat() if isinstance(value, pd.Timestamp) else value
