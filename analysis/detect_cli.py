"""`tunnelwatch events detect`: where a series (or the store's outages) departs from its
local baseline, found without the dates, and the events near each departure with the chance
of such a match. Argument parsing and output only; the statistics are in detect.py, which
loads pymannkendall, scipy and statsmodels only when a detection runs."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click
import numpy as np
import pandas as pd

from probe.config import Config
from probe.console import err
from probe.errors import ConfigError

from . import options
from .detect import (
    MIN_HISTORY,
    MK_WINDOW,
    THRESHOLD,
    Signal,
    base_rate,
    baseline_signals,
    block_average,
    events_near,
    mann_kendall_signals,
)
from .eventcheck import outage_series
from .events import CATEGORIES, select
from .pipeline import analyse_config, source
from .series import read_series

COLUMNS = [
    "start",
    "end",
    "kind",
    "length",
    "through",
    "peak_value",
    "peak_baseline",
    "peak_z",
    "events",
    "within_days",
    "base_rate",
]
TABLE_COLUMNS = {
    "baseline": ["start", "end", "kind", "length", "peak_value", "peak_baseline", "peak_z", "events"],
    "mann-kendall": ["start", "end", "kind", "length", "through", "events"],
}


@click.command("detect")
@options.series_options(
    "A daily CSV series (a date column and --column) instead of the store's outage minutes per day."
)
@click.option(
    "--method",
    type=click.Choice(["baseline", "mann-kendall"]),
    default="baseline",
    show_default=True,
    help="baseline: each value's robust z against the median of the 28 values before it; mann-kendall: "
    "the ACSAC 2024 framework (trend tests in sliding windows of 10 values, control charts).",
)
@click.option(
    "--block",
    type=click.IntRange(min=2),
    help="First average this many consecutive available values, "
    "each block dated by its first (the paper uses 5 for counts; mann-kendall then charts "
    "averages).",
)
@options.missing_option("This value means missing, e.g. 0 for Google Trends (repeatable).")
@click.option(
    "--threshold",
    type=click.FloatRange(min=0, min_open=True),
    default=THRESHOLD,
    show_default=True,
    help="baseline: the robust z beyond which a value departs.",
)
@click.option(
    "--within",
    "within_days",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Events this many days either side of a signal's start match it.",
)
@options.category_option(f"Only events of this category: {', '.join(CATEGORIES)} (default: all but holiday).")
@options.events_option()
@options.since_until()
@options.paths_targets(
    "Only outages of this path (without --series).", "Only outages affecting this target (without --series)."
)
@options.format_option
@options.store_options
def events_detect(
    series: Path | None,
    column: str | None,
    method: str,
    block: int | None,
    missing: tuple[float, ...],
    threshold: float,
    within_days: int,
    categories: tuple[str, ...],
    event_files: tuple[Path, ...],
    since: datetime | None,
    until: datetime | None,
    paths: tuple[str, ...],
    targets: tuple[str, ...],
    fmt: str,
    store: str | None,
    vantage: str | None,
    config: Path | None,
) -> None:
    """Where a series (or the store's outage minutes per day) departs from its local baseline,
    found without the dates, with the events near each start and the chance of such a match."""
    options.check_range(since, until)
    options.check_series(series, column)
    cfg = options.configured(config, store, vantage)
    events = select(options.events_of(cfg, event_files), categories=categories)
    if not categories:
        events = [e for e in events if e.category != "holiday"]
    if series is not None and column is not None:
        values, what = _series(series, column, since, until, missing), f"{series}: {column}"
    else:
        values, what = _outage_minutes(cfg, since, until, targets, paths), f"{source(cfg)}: outage minutes per day"
    values = values.mask(values.isin(missing)).dropna()
    if values.empty:
        raise ConfigError(f"{what}: no values in that range" + (" that are not --missing" if missing else ""))
    judged = block_average(values, block) if block else values
    if method == "mann-kendall":
        if len(judged) < MK_WINDOW:
            raise ConfigError(f"{what}: {len(judged)} values{_after(block)}; mann-kendall needs {MK_WINDOW}")
        signals = mann_kendall_signals(judged, "averages" if block else "individuals")
    else:
        if len(judged) <= MIN_HISTORY:
            raise ConfigError(
                f"{what}: {len(judged)} values{_after(block)}; the baseline method needs more than "
                f"{MIN_HISTORY} (the history before the first value it judges)"
            )
        signals = baseline_signals(judged, threshold=threshold)
    first, last = values.index[0].date(), values.index[-1].date()
    rate = base_rate(first, last, events, within_days)
    rows = [_row(s, events_near(s.start.date(), events, within_days), within_days, rate) for s in signals]
    options.emit(
        rows,
        COLUMNS if fmt != "table" else TABLE_COLUMNS[method],
        fmt,
        f"{what}: departures ({method}); events within ±{within_days} days of the start",
    )
    _summary(rows, rate, within_days, first, last)


def _after(block: int | None) -> str:
    return f" after blocks of {block}" if block else ""


def _series(
    path: Path, column: str, since: datetime | None, until: datetime | None, missing: tuple[float, ...] = ()
) -> pd.Series:
    """The series' values, each hour's mean where it has several (a daily series: its days)."""
    hours = read_series(
        path, column, pd.Timestamp(since) if since else None, pd.Timestamp(until) if until else None, missing
    )  # stand-ins are missing before they are averaged into an hour
    return hours.sums["sum"] / hours.sums["count"]


def _outage_minutes(
    cfg: Config, since: datetime | None, until: datetime | None, targets: tuple[str, ...], paths: tuple[str, ...]
) -> pd.Series:
    """Outage minutes per UTC day (any path down, degradation left out), scaled to the day's
    measured time; a day with nothing measured is missing, never zero."""
    result = analyse_config(cfg, since, until, targets=targets, paths=paths)
    if result.span is None:
        raise ConfigError(f"{source(cfg)}: no measurements in that range to detect outages in")
    outages = result.paths[result.paths["verdict"] != "degraded"]
    binned = outage_series(outages, result.summary.coverage, *result.span)
    times = binned.start + binned.step * np.arange(len(binned.value))
    days = pd.DataFrame({"down": binned.value, "measured": binned.exposure}, index=times).resample("1D").sum()
    return (24 * 60 * days["down"] / days["measured"]).where(days["measured"] > 0)


def _row(signal: Signal, near: list[str], within_days: int, rate: float) -> dict[str, object]:
    return {
        "start": signal.start.date().isoformat(),
        "end": signal.end.date().isoformat(),
        "kind": signal.kind,
        "length": signal.length,
        "through": signal.through.date().isoformat(),
        "peak_value": signal.peak_value,
        "peak_baseline": signal.peak_baseline,
        "peak_z": None if signal.peak_z is None else round(signal.peak_z, 2),
        "events": tuple(near),
        "within_days": within_days,
        "base_rate": round(rate, 4),
    }


def _summary(rows: list[dict[str, object]], rate: float, within_days: int, first: object, last: object) -> None:
    if not rows:
        err.print("no departures from the baseline")
        return
    from scipy.stats import binomtest

    matched = sum(bool(r["events"]) for r in rows)
    p = binomtest(matched, len(rows), rate, alternative="greater").pvalue
    err.print(
        f"{matched} of {len(rows)} signals start within ±{within_days} days of an event; {rate:.1%} of the "
        f"days {first} to {last} do, so {rate * len(rows):.1f} would by chance (binomial p = {p:.2g}, if the "
        "starts were independent)"
    )
