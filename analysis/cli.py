"""The analysis command line: the groups `tunnelwatch events`, `chart`, `report` and `store`
and their commands. `outages` (outages_cli.py), `events check` (check_cli.py) and `events
detect` (detect_cli.py) live in modules of their own, loaded when one of them runs; the
commands here load what they need when they run, so `events list` starts without pandas or
matplotlib. Argument parsing and output only; the work is in the analysis modules."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from probe.config import load_config
from probe.console import LazyGroup, config_option, err
from probe.errors import ConfigError
from probe.pgurl import POSTGRES_SCHEMES

from . import options
from .events import select

if TYPE_CHECKING:
    from probe.config import Config

    from .report import Week

T = TypeVar("T")
EVENT_COMMANDS = {  # where each lives, and its short help (its docstring's first sentence)
    "check": (
        "analysis.check_cli:events_check",
        "For each event window: its departure from the local baseline, the ratio with a 95 % interval, a "
        "p-value from the series' own ordinary dates, q-values across the events, and the lead or lag of the "
        "first outage.",
    ),
    "detect": (
        "analysis.detect_cli:events_detect",
        "Where a series (or the store's outage minutes per day) departs from its local baseline, found "
        "without the dates, with the events near each start and the chance of such a match.",
    ),
}


@click.group(name="events", cls=LazyGroup, lazy=EVENT_COMMANDS)
def events_group() -> None:
    """The event calendar, and whether outages lined up with it."""


@events_group.command("list")
@click.option("--year", type=int, help="Only events in this year.")
@options.category_option()
@options.events_option()
@options.format_option
@config_option
def events_list(
    year: int | None, categories: tuple[str, ...], event_files: tuple[Path, ...], fmt: str, config: Path | None
) -> None:
    """List known events."""
    cfg = load_config(config)
    chosen = select(options.events_of(cfg, event_files), categories=categories, year=year)
    rows = [{**e.model_dump(), "start": str(e.start), "end": str(e.end)} for e in chosen]
    options.emit(
        rows,
        ["id", "category", "start", "end", "confidence", "title", "source"],
        fmt,
        "events (dates are Beijing dates)",
    )


def _week(
    cfg: Config,
    label: str | None,
    since: datetime | None,
    until: datetime | None,
    tz: str | None,
    measure: Callable[[Week], T],
    measured: Callable[[T], bool],
) -> tuple[Week, T]:
    """The week asked for and what `measure` makes of it. Without --week (or --since and
    --until), the last complete week; when that holds no measurement and the current week
    does, the current week so far. Says on standard error which week it is and, when it holds
    no measurement, which weeks do."""
    from .report import measured_weeks, period, span, this_week, week

    zone = tz or cfg.report.timezone
    if since or until:
        if label or not (since and until):
            raise click.BadParameter("give --week, or both --since and --until")
        options.check_range(since, until)
        chosen = span(since, until, zone)
    else:
        # One reading of the clock for both weeks: at Monday 00:00 they must stay neighbours.
        current = this_week(zone, datetime.now(UTC))
        chosen = week(label, zone, today=current.start.tz_convert(zone).date())
    result = measure(chosen)
    if not measured(result) and label is None and since is None:
        now = measure(current)
        if measured(now):
            err.print(f"{chosen.label}, the last complete week, holds no measurement: the current week so far instead")
            chosen, result = current, now
    if measured(result):
        err.print(f"{chosen.label}: {period(chosen)}")
    else:
        held = measured_weeks(cfg, zone)
        where = f"the store holds measurements in {', '.join(held)}" if held else "the store holds none yet"
        err.print(f"{chosen.label}: {period(chosen)}: no measurement; {where} (choose a week with --week)")
    return chosen, result


@click.group(name="chart")
def chart_group() -> None:
    """Charts of the measurements."""


@chart_group.command("weekly")
@click.option("--week", "label", help="ISO week, e.g. 2018-W10 (default: last complete week).")
@click.option("--since", type=options.When(), help="Instead of a week: from this date.")
@click.option("--until", type=options.When(), help="Instead of a week: up to this date.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("charts"), show_default=True)
@click.option("--format", "fmt", type=click.Choice(["png", "svg"]), default="png", show_default=True)
@click.option("--tz", help="Time zone of the axes (default: report.timezone).")
@options.store_options
def chart_weekly(
    label: str | None,
    since: datetime | None,
    until: datetime | None,
    out: Path,
    fmt: str,
    tz: str | None,
    store: str | None,
    vantage: str | None,
    config: Path | None,
) -> None:
    """Availability heatmap, latency smoke and outage timeline of one week."""
    from .report import analyse_week, save_figures, weekly_figures

    cfg = options.configured(config, store, vantage)
    w, result = _week(cfg, label, since, until, tz, lambda w: analyse_week(cfg, w), lambda r: r.span is not None)
    for path in save_figures(weekly_figures(cfg, w, options.events_of(cfg), result), out, w.label, fmt):
        err.print(f"wrote {path}")


@click.group(name="report")
def report_group() -> None:
    """Reports of the measurements."""


@report_group.command("weekly")
@click.option("--week", "label", help="ISO week, e.g. 2018-W10 (default: last complete week).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="HTML file (default: reports/WEEK.html).")
@click.option("--tz", help="Time zone (default: report.timezone).")
@click.option(
    "--scheduled",
    is_flag=True,
    help="What the daemon runs on Mondays: last week's report and charts "
    "into report.directory, keeping the newest report.keep.",
)
@options.store_options
def report_weekly(
    label: str | None,
    out: Path | None,
    tz: str | None,
    scheduled: bool,
    store: str | None,
    vantage: str | None,
    config: Path | None,
) -> None:
    """A self-contained HTML report of one week, and a Markdown summary beside it."""
    from .report import build_report, write_report, write_weekly

    cfg = options.configured(config, store, vantage)
    if scheduled:
        page, summary = write_weekly(cfg)
        err.print(f"wrote {page} and {summary}")
        return
    w, report = _week(cfg, label, None, None, tz, lambda w: build_report(cfg, w), lambda r: r.measured)
    page, summary = write_report(report, out or cfg.report.directory / f"tunnelwatch-{w.label}.html")
    err.print(f"wrote {page} and {summary}")


@click.group(name="store")
def store_group() -> None:
    """Look after the store."""


@store_group.command("compact")
@config_option
def store_compact(config: Path | None) -> None:
    """Summarise complete hours (verdict runs, hourly counts and latency, coverage) and delete
    raw rows older than store.keep_raw_days. The daemon runs this every hour."""
    from .compaction import compact

    cfg = load_config(config)
    hours, deleted = compact(
        cfg.store.path, cfg.probe.interval_s, cfg.store.keep_raw_days, keep_unforwarded=cfg.store.url is not None
    )
    err.print(
        f"summarised {hours} hours; deleted {deleted} raw measurements older than {cfg.store.keep_raw_days:g} days"
    )


@store_group.command("retire")
@click.option(
    "--keep-months",
    type=click.IntRange(min=0),
    required=True,
    help="Months of raw rows to keep in the central store, besides the current one.",
)
@click.option("--store", "store", help="The central store's postgresql:// URL (default: store.url).")
@config_option
def store_retire(keep_months: int, store: str | None, config: Path | None) -> None:
    """Drop the central store's monthly partitions of raw rows older than --keep-months that
    every vantage point's summaries cover; analysis answers from the summaries there."""
    import pandas as pd

    from probe.store.central import CentralStore

    cfg = load_config(config)
    url = options.checked_store(store) if store else (cfg.store.url.get_secret_value() if cfg.store.url else None)
    if not url or not url.startswith(POSTGRES_SCHEMES):
        raise ConfigError(
            f"{cfg.source}: store.url: no central store to retire months of; set it or give --store postgresql://..."
        )
    now = pd.Timestamp.now(tz="UTC")
    before = pd.Timestamp(now.year, now.month, 1, tz="UTC") - pd.DateOffset(months=keep_months)
    with CentralStore(url) as central:
        dropped, covered = central.drop_months(round(before.timestamp() * 1000))
    reach = (
        "a vantage point has no summaries yet: its raw rows are all it has"
        if covered is None
        else f"every vantage point's summaries reach {pd.Timestamp(covered, unit='ms', tz='UTC'):%Y-%m-%d %H:%M} UTC"
    )
    err.print(
        f"dropped {len(dropped)} monthly partitions ({', '.join(dropped) or 'none'}) before {before:%Y-%m}; {reach}"
    )
