"""`tunnelwatch events check`: did outages (or an external series) line up with the calendar's
events beyond chance. Argument parsing and output only; the statistics are in eventcheck.py
and eventstats.py."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import click
import pandas as pd

from probe.console import err
from probe.errors import ConfigError

from . import options
from .eventcheck import Check, binned_series, check_events, outage_series
from .events import select
from .eventstats import Method
from .pipeline import analyse_config, source
from .series import read_series

COLUMNS = [
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
MORE_COLUMNS = [  # beyond the table
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
UNIT_HELP = (
    "The unit of the statistics: the series is averaged per unit (outages binned at a 24th of it). Shorter "
    "units suit short runs, e.g. 1h, or 1s for a lab run of minutes."
)
# The windows of the statistics, each a whole number of --unit: option, default, help.
METHOD_OPTIONS = (
    ("--baseline", "28d", "How much usable data before each window is its baseline."),
    ("--gap", "7d", "Between the baseline's end and the window."),
    ("--onset-before", "3d", "Try onsets up to this much before the calendar's start ..."),
    ("--onset-after", "14d", "... and up to this much after it (the search is paid for in the p-value)."),
    ("--placebo-gap", "30d", "Placebo dates keep this far from every event and holiday."),
)


@click.command("check")
@click.option("--event", "ids", multiple=True, help="Only this event id (repeatable).")
@options.category_option()
@options.paths_targets("Only outages of this path (repeatable).", "Only outages affecting this target (repeatable).")
@options.duration_option("--before", "0", "Widen each window this much before (e.g. 3d).", show_default=False)
@options.duration_option("--after", "0", "Widen each window this much after (e.g. 2d).", show_default=False)
@options.duration_option("--unit", "1d", UNIT_HELP)
@options.apply(*(options.duration_option(name, default, help) for name, default, help in METHOD_OPTIONS))
@click.option(
    "--seasonal",
    type=options.Duration(),
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
@options.missing_option("This value of --series means missing, e.g. 0 for Google Trends (repeatable).")
@click.option("--pool", is_flag=True, help="Add a row per category: its events as a whole.")
@options.since_until()
@options.series_options("Test an external daily or hourly CSV series instead of the store's outages.")
@options.events_option()
@options.format_option
@options.store_options
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
    scale: Literal["auto", "log", "linear"],
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
    options.check_range(since, until)
    options.check_series(series, column)
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
        scale=scale,
        two_sided=series is not None,
    )
    cfg = options.configured(config, store, vantage)
    every = options.events_of(cfg, event_files)
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
    what = f"{series.name}: mean of {column}" if series else "outage minutes per measured minute"
    options.emit(
        _rows(checks, series is not None),
        COLUMNS if fmt == "table" else COLUMNS + MORE_COLUMNS,
        fmt,
        f"events against {what} (windows UTC)",
    )


def _rows(checks: list[Check], series_mode: bool) -> list[dict[str, Any]]:
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
