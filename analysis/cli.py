"""Commands that answer questions: `tunnelwatch outages`, `tunnelwatch events list|check`.
Argument parsing and output only; the work is in the analysis modules."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pandas as pd
from pydantic import SecretStr
from rich.table import Table
from rich.text import Text

from probe.config import Config, load_config
from probe.console import config_option, err, out
from probe.errors import ConfigError
from probe.pgurl import POSTGRES_SCHEMES, postgres_url_problem, redact

from .eventcheck import Check, binned_series, check_events, outage_series
from .events import CATEGORIES, Event, load_events, select
from .eventstats import Method
from .fleet import FLEET_COLUMNS, fleet_outages
from .frames import vantages
from .pipeline import analyse_config, source, store_of
from .series import read_series

DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(d|h|min|m|s)$")
UNITS = {"d": "days", "h": "hours", "min": "minutes", "m": "minutes", "s": "seconds"}
FORMATS = click.Choice(["table", "csv", "json"])


class When(click.ParamType):
    """A date (midnight UTC) or an ISO 8601 date and time (UTC unless it has an offset)."""

    name = "date"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not a date; use 2018-03-31 or 2018-03-31T08:00+08:00", param, ctx)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> pd.Timedelta:
        if isinstance(value, pd.Timedelta):
            return value
        match = DURATION.match(str(value).strip())
        if str(value).strip() == "0":
            return pd.Timedelta(0)
        if not match:
            self.fail(f"{value!r} is not a duration; use e.g. 3d, 12h, 90min or 0", param, ctx)
        return pd.Timedelta(**{UNITS[match.group(2)]: float(match.group(1))})


def _range(since: datetime | None, until: datetime | None) -> None:
    if since and until and since >= until:
        raise click.BadParameter(f"--since {since.isoformat()} is not before --until {until.isoformat()}")


def _events(cfg: Config, extra: Sequence[Path]) -> list[Event]:
    return load_events([*cfg.analysis.events, *extra])


def _cell(value: Any) -> str:
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.3g}"
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and pd.isna(value):
        return None
    return value


def emit(rows: list[dict[str, Any]], columns: list[str], fmt: str, title: str) -> None:
    if fmt == "json":
        for row in rows:
            sys.stdout.write(json.dumps({c: _jsonable(row.get(c)) for c in columns}) + "\n")
    elif fmt == "csv":
        frame = pd.DataFrame([{c: _jsonable(row.get(c)) for c in columns} for row in rows], columns=columns)
        frame.to_csv(sys.stdout, index=False)
    else:
        table = Table(title=Text(title))  # Text: what users wrote (titles, file names) is never markup
        for column in columns:
            table.add_column(column.replace("_", " "))
        for row in rows:
            table.add_row(*(Text(_cell(row.get(c))) for c in columns))
        out.print(table)


def _overlapping(start: pd.Timestamp, end: pd.Timestamp, events: Sequence[Event]) -> tuple[str, ...]:
    return tuple(e.id for e in events if e.window[0] < end and start < e.window[1])


def store_options(command: Any) -> Any:
    """--store and --vantage: what to analyse, instead of the config's own store."""
    command = click.option("--vantage", help="The vantage point to analyse, of a store that holds several.")(command)
    return click.option(
        "--store",
        "store",
        help="A store to analyse instead of store.path: a SQLite file or the fleet's postgresql:// URL.",
    )(command)


def _checked_store(store: str) -> str:
    """--store, refused (quoting it without its password) when libpq would misread the URL:
    its parse errors quote the password."""
    if store.startswith(POSTGRES_SCHEMES) and (problem := postgres_url_problem(store)):
        raise ConfigError(f"--store: {problem} (got {redact(store)!r})")
    return store


def _configured(config: Path | None, store: str | None = None, vantage: str | None = None) -> Config:
    cfg = load_config(config)
    changes: dict[str, Any] = {}
    if store:
        changes["store"] = SecretStr(_checked_store(store))
    if vantage:
        changes["vantage"] = vantage
    return cfg.model_copy(update={"analysis": cfg.analysis.model_copy(update=changes)}) if changes else cfg


@click.command()
@click.option("--since", type=When(), help="From this date or time (UTC unless it has an offset).")
@click.option("--until", type=When(), help="Up to this date or time.")
@click.option("--path", "-p", "paths", multiple=True, help="Only this path (repeatable).")
@click.option("--target", "-t", "targets", multiple=True, help="Only this target (repeatable).")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    help="Only this verdict: blocked, tunnel_down, local_outage, site_down, degraded, inconclusive (repeatable).",
)
@click.option(
    "--by",
    type=click.Choice(["path", "target"]),
    default="path",
    show_default=True,
    help="One row per path outage, or per (target, path) outage.",
)
@click.option(
    "--events",
    "event_files",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="More events (TOML or .ics) to match outages against.",
)
@click.option(
    "--fleet",
    is_flag=True,
    help="Every vantage point of the store side by side: outages that at least --quorum of them agree on.",
)
@click.option(
    "--quorum",
    type=click.IntRange(min=1),
    help="Vantage points that must agree (with --fleet; default: analysis.fleet_quorum).",
)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@store_options
@config_option
def outages(
    since: datetime | None,
    until: datetime | None,
    paths: tuple[str, ...],
    targets: tuple[str, ...],
    kinds: tuple[str, ...],
    by: str,
    event_files: tuple[Path, ...],
    fleet: bool,
    quorum: int | None,
    fmt: str,
    store: str | None,
    vantage: str | None,
    config: Path | None,
) -> None:
    """Outage intervals with their verdict, duration and the events they overlap."""
    _range(since, until)
    cfg = _configured(config, store, vantage)
    events = _events(cfg, event_files)
    if fleet:
        _fleet(cfg, since, until, targets, paths, kinds, quorum or cfg.analysis.fleet_quorum, events, fmt)
        return
    result = analyse_config(cfg, since, until, targets=targets, paths=paths)
    frame = result.paths if by == "path" else result.pairs
    if kinds:
        frame = frame[frame["verdict"].isin(kinds)]
    rows = []
    for row in frame.sort_values(["start", "path"]).to_dict("records"):
        row["duration"] = str(pd.Timedelta(minutes=round(row["minutes"]))).removeprefix("0 days ")
        row["events"] = _overlapping(row["start"], row["end"], events)
        row["targets"] = row["targets"] if by == "path" else (row["target"],)
        rows.append(row)
    columns = [
        "path",
        "targets",
        "start",
        "end",
        "duration",
        "minutes",
        "verdict",
        "rules",
        "factor",
        "events",
        "ongoing",
    ]
    emit(rows, columns, fmt, f"outages by {by} (times UTC)")
    if fmt == "table" and not rows:
        err.print("no outages in that range" if result.span else "no measurements in that range")


def _fleet(
    cfg: Config,
    since: datetime | None,
    until: datetime | None,
    targets: tuple[str, ...],
    paths: tuple[str, ...],
    kinds: tuple[str, ...],
    quorum: int,
    events: Sequence[Event],
    fmt: str,
) -> None:
    """Each vantage point analysed alone, then the outages enough of them agree on."""
    if cfg.analysis.vantage:
        raise click.BadParameter("--fleet reads every vantage point; leave out --vantage")
    held = vantages(store_of(cfg))
    each = []
    for name in held:
        one = cfg.model_copy(update={"analysis": cfg.analysis.model_copy(update={"vantage": name})})
        each.append(analyse_config(one, since, until, targets=targets, paths=paths).pairs.assign(vantage=name))
    frame = fleet_outages(
        pd.concat(each, ignore_index=True)
        if each
        else pd.DataFrame(columns=["vantage", "target", "verdict", "start", "end"]),
        len(held),
        quorum,
    )
    if kinds:
        frame = frame[frame["verdict"].isin(kinds)]
    rows = [
        {**row, "events": _overlapping(row["start"], row["end"], events)}
        for row in frame.sort_values(["start", "target"]).to_dict("records")
    ]
    emit(rows, [*FLEET_COLUMNS, "events"], fmt, f"outages {quorum} of {len(held)} vantage points agree on (times UTC)")
    if fmt == "table" and not rows:
        err.print(f"no outage that {quorum} of the {len(held)} vantage points ({', '.join(held)}) agree on")


@click.group(name="events")
def events_group() -> None:
    """The event calendar, and whether outages lined up with it."""


@events_group.command("list")
@click.option("--year", type=int, help="Only events in this year.")
@click.option("--category", "categories", multiple=True, help=f"Only this category: {', '.join(CATEGORIES)}.")
@click.option(
    "--events",
    "event_files",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="More events (TOML or .ics).",
)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@config_option
def events_list(
    year: int | None, categories: tuple[str, ...], event_files: tuple[Path, ...], fmt: str, config: Path | None
) -> None:
    """List known events."""
    cfg = load_config(config)
    chosen = select(_events(cfg, event_files), categories=categories, year=year)
    rows = [{**e.model_dump(), "start": str(e.start), "end": str(e.end)} for e in chosen]
    emit(
        rows,
        ["id", "category", "start", "end", "confidence", "title", "source"],
        fmt,
        "events (dates are Beijing dates)",
    )


def _check_rows(checks: list[Check], series_mode: bool) -> list[dict[str, Any]]:
    rows = []
    for c in checks:
        row = c.as_dict()
        if c.window_start is not None and c.window_end is not None:
            row["window"] = f"{c.window_start:%Y-%m-%d %H:%M} - {c.window_end:%Y-%m-%d %H:%M}"
        if c.inside_rate is not None and c.baseline_rate is not None:
            if series_mode:
                row["inside"], row["baseline"] = f"{c.inside_rate:.4g}", f"{c.baseline_rate:.4g}"
            else:
                row["inside"], row["baseline"] = f"{100 * c.inside_rate:.2f} %", f"{100 * c.baseline_rate:.2f} %"
        if c.ratio is not None:
            interval = f" [{c.ci_low:.2f}, {c.ci_high:.2f}]" if c.ci_low is not None and c.ci_high is not None else ""
            row["ratio_95ci"] = f"{c.ratio:.2f}{interval}"
        for key in ("p_value", "q_value"):
            if row.get(key) is not None:
                row[key] = float(f"{row[key]:.3g}")  # significant digits: a p of 1e-5 stays 1e-5
        rows.append(row)
    return rows


def _in_units(what: str, value: pd.Timedelta, unit: pd.Timedelta, least: int) -> int:
    units = int(round(value / unit))
    if abs(value / unit - units) > 1e-9:
        raise click.BadParameter(f"{what} {value} is not a whole number of units of {unit} (--unit)")
    if units < least:
        raise click.BadParameter(f"{what} {value} is {units} units of {unit}; it must be at least {least}")
    return units


@events_group.command("check")
@click.option("--event", "ids", multiple=True, help="Only this event id (repeatable).")
@click.option("--category", "categories", multiple=True, help=f"Only this category: {', '.join(CATEGORIES)}.")
@click.option("--path", "-p", "paths", multiple=True, help="Only outages of this path (repeatable).")
@click.option("--target", "-t", "targets", multiple=True, help="Only outages affecting this target (repeatable).")
@click.option("--before", type=Duration(), default="0", help="Widen each window this much before (e.g. 3d).")
@click.option("--after", type=Duration(), default="0", help="Widen each window this much after (e.g. 2d).")
@click.option(
    "--unit",
    type=Duration(),
    default="1d",
    show_default=True,
    help="The unit of the statistics: the series is averaged per unit (outages binned at a 24th of "
    "it). Shorter units suit short runs, e.g. 1h, or 1s for a lab run of minutes.",
)
@click.option(
    "--baseline",
    type=Duration(),
    default="28d",
    show_default=True,
    help="How much usable data before each window is its baseline.",
)
@click.option(
    "--gap", type=Duration(), default="7d", show_default=True, help="Between the baseline's end and the window."
)
@click.option(
    "--onset-before",
    type=Duration(),
    default="3d",
    show_default=True,
    help="Try onsets up to this much before the calendar's start ...",
)
@click.option(
    "--onset-after",
    type=Duration(),
    default="14d",
    show_default=True,
    help="... and up to this much after it (the search is paid for in the p-value).",
)
@click.option(
    "--placebo-gap",
    type=Duration(),
    default="30d",
    show_default=True,
    help="Placebo dates keep this far from every event and holiday.",
)
@click.option(
    "--seasonal",
    type=Duration(),
    multiple=True,
    help="Remove a cycle of this period first (statsmodels MSTL), e.g. 7d for a weekly one (repeatable).",
)
@click.option(
    "--scale",
    type=click.Choice(["auto", "log", "linear"]),
    default="auto",
    show_default=True,
    help="auto: log when every value is positive (a series), linear otherwise (outage shares).",
)
@click.option(
    "--missing",
    type=float,
    multiple=True,
    help="This value of --series means missing, e.g. 0 for Google Trends (repeatable).",
)
@click.option("--pool", is_flag=True, help="Add a row per category: its events as a whole.")
@click.option("--since", type=When(), help="Only data from this date.")
@click.option("--until", type=When(), help="Only data up to this date.")
@click.option(
    "--series",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Test an external daily or hourly CSV series instead of the store's outages.",
)
@click.option("--column", help="The series' value column (with --series).")
@click.option(
    "--events",
    "event_files",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="More events (TOML or .ics).",
)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@store_options
@config_option
def events_check(
    ids: tuple[str, ...],
    categories: tuple[str, ...],
    paths: tuple[str, ...],
    targets: tuple[str, ...],
    before: pd.Timedelta,
    after: pd.Timedelta,
    unit: pd.Timedelta,
    baseline: pd.Timedelta,
    gap: pd.Timedelta,
    onset_before: pd.Timedelta,
    onset_after: pd.Timedelta,
    placebo_gap: pd.Timedelta,
    seasonal: tuple[pd.Timedelta, ...],
    scale: str,
    missing: tuple[float, ...],
    pool: bool,
    since: datetime | None,
    until: datetime | None,
    series: Path | None,
    column: str | None,
    event_files: tuple[Path, ...],
    fmt: str,
    store: str | None,
    vantage: str | None,
    config: Path | None,
) -> None:
    """For each event window: its departure from the local baseline, the ratio with a 95 %
    interval, a p-value from the series' own ordinary dates, q-values across the events,
    and the lead or lag of the first outage."""
    _range(since, until)
    if (series is None) != (column is None):
        raise click.BadParameter("--series and --column go together")
    if missing and series is None:
        raise click.BadParameter("--missing is for --series: the store's outage series has no stand-in values")
    if unit <= pd.Timedelta(0):
        raise click.BadParameter(f"--unit {unit} must be longer than 0")
    method = Method(
        baseline=_in_units("--baseline", baseline, unit, 2),
        gap=_in_units("--gap", gap, unit, 0),
        shifts=(-_in_units("--onset-before", onset_before, unit, 0), _in_units("--onset-after", onset_after, unit, 0)),
        placebo_gap=_in_units("--placebo-gap", placebo_gap, unit, 0),
        seasonal=tuple(_in_units("--seasonal", period, unit, 2) for period in seasonal),
        scale=scale,  # type: ignore[arg-type]
        two_sided=series is not None,
    )
    cfg = _configured(config, store, vantage)
    every = _events(cfg, event_files)
    chosen = select(every, ids=ids, categories=categories)
    if series is not None and column is not None:
        hours = read_series(
            series, column, pd.Timestamp(since) if since else None, pd.Timestamp(until) if until else None, missing
        )
        data = binned_series(hours.sums)
        if unit < data.step or unit % data.step:
            raise click.BadParameter(f"--unit {unit} must be a whole number of the series' steps ({data.step})")
        data = replace(data, unit=unit)
        span = (hours.first, hours.last)
        firsts = None
    else:
        result = analyse_config(cfg, since, until, targets=targets, paths=paths)
        if result.span is None:
            raise ConfigError(f"{source(cfg)}: no measurements in that range to check events against")
        span = result.span
        outages = result.paths[result.paths["verdict"] != "degraded"]
        data = outage_series(outages, result.summary.coverage, span[0], span[1], unit)
        firsts = outages["start"] if len(outages) else None
    spanned = len(data.per_unit()[0])
    if spanned < method.baseline + method.gap + 1:
        raise ConfigError(
            f"{series or source(cfg)}: the data spans {spanned} {data.units}; the baseline alone "
            f"needs {method.baseline + method.gap} before a window (--baseline and --gap): give more "
            "data or a shorter --baseline"
        )
    if not ids and not categories:
        chosen = [e for e in chosen if e.category != "holiday"]
    chosen = [e for e in chosen if e.window[0] - before < span[1] and span[0] < e.window[1] + after]
    if not chosen:
        err.print(f"no event falls within the data ({span[0]:%Y-%m-%d} to {span[1]:%Y-%m-%d})")
        return
    try:
        checks = check_events(
            data, chosen, every, before=before, after=after, first_outages=firsts, method=method, pooled=pool
        )
    except ValueError as exc:  # a log scale asked of values at or below 0; too little data for --seasonal
        raise ConfigError(f"{series or source(cfg)}: {exc}") from None
    columns = [
        "event",
        "category",
        "window",
        "coverage",
        "inside",
        "baseline",
        "ratio_95ci",
        "p_value",
        "q_value",
        "onset_shift_units",
        "lead_lag_hours",
        "verdict",
    ]
    if fmt != "table":
        columns += [
            "ratio",
            "ci_low",
            "ci_high",
            "inside_rate",
            "baseline_rate",
            "placebos",
            "pooled",
            "agree",
            "left_out",
            "window_start",
            "window_end",
            "title",
        ]
    what = f"{series.name}: mean of {column}" if series else "outage minutes per measured minute"
    emit(_check_rows(checks, series is not None), columns, fmt, f"events against {what} (windows UTC)")


def _week(cfg: Config, label: str | None, since: datetime | None, until: datetime | None, tz: str | None) -> Any:
    from .report import span, week

    zone = tz or cfg.report.timezone
    if since or until:
        if label or not (since and until):
            raise click.BadParameter("give --week, or both --since and --until")
        _range(since, until)
        return span(since, until, zone)
    return week(label, zone)


@click.group(name="chart")
def chart_group() -> None:
    """Charts of the measurements."""


@chart_group.command("weekly")
@click.option("--week", "label", help="ISO week, e.g. 2018-W10 (default: last complete week).")
@click.option("--since", type=When(), help="Instead of a week: from this date.")
@click.option("--until", type=When(), help="Instead of a week: up to this date.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("charts"), show_default=True)
@click.option("--format", "fmt", type=click.Choice(["png", "svg"]), default="png", show_default=True)
@click.option("--tz", help="Time zone of the axes (default: report.timezone).")
@store_options
@config_option
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
    from .report import save_figures, weekly_figures

    cfg = _configured(config, store, vantage)
    w = _week(cfg, label, since, until, tz)
    for path in save_figures(weekly_figures(cfg, w, _events(cfg, ())), out, w.label, fmt):
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
@store_options
@config_option
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
    from .report import write_report, write_weekly

    cfg = _configured(config, store, vantage)
    if scheduled:
        page, summary = write_weekly(cfg)
        err.print(f"wrote {page} and {summary}")
        return
    w = _week(cfg, label, None, None, tz)
    page, summary = write_report(cfg, w, out or cfg.report.directory / f"tunnelwatch-{w.label}.html")
    err.print(f"wrote {page} and {summary}")


@click.group(name="store")
def store_group() -> None:
    """Look after the store."""


@store_group.command("compact")
@config_option
def store_compact(config: Path | None) -> None:
    """Summarise complete hours (verdict runs, hourly counts and latency, coverage) and delete
    raw rows older than store.keep_raw_days. The daemon runs this every hour."""
    from .rollup import compact

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
    from probe.store.central import CentralStore

    cfg = load_config(config)
    url = _checked_store(store) if store else (cfg.store.url.get_secret_value() if cfg.store.url else None)
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


from . import detect_cli  # noqa: E402, F401  registers `events detect`, which uses this module's helpers
