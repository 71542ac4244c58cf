"""Did outages (or an external series) line up with events beyond chance?

One pipeline for both inputs: the store's outage minutes per measured minute, or an
external series' mean, per unit (a day unless told otherwise; a lab run of minutes uses
seconds), a unit with less than half its time measured being missing. analysis/eventstats.py
then compares each event's window with its local baseline and with the series' own
ordinary dates (placebo-calibrated p-values), Benjamini-Hochberg q-values across the
events of one run, and, with `pool`, each category as a whole. A verdict in words that
starts with "effect", "no effect" or "not evaluable".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from .events import Event
from .eventstats import Calculator, Effect, Method, pool, q_values
from .summary import union

ALPHA = 0.05
DAY = pd.Timedelta(days=1)
BINS_PER_UNIT = 24  # outage series: hourly bins for daily units


@dataclass(frozen=True, slots=True)
class Series:
    """A regular series: `value` and `exposure` per bin (outage minutes and measured minutes,
    or a measurement and 1 where present)."""

    start: pd.Timestamp
    step: pd.Timedelta
    value: np.ndarray
    exposure: np.ndarray
    unit: pd.Timedelta = DAY  # the independent unit of the statistics, a whole number of steps
    full: float = 1.0  # a bin's exposure when all of it was measured

    @property
    def bins_per_unit(self) -> int:
        return max(1, int(self.unit / self.step))

    @property
    def units(self) -> str:
        return "days" if self.unit == DAY else f"units of {_duration(self.unit)}"

    @property
    def unit_start(self) -> pd.Timestamp:
        """Where the first unit starts: units are whole units of UTC time (days start at 00:00 UTC)."""
        return self.start.floor(self.unit)

    def per_unit(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean (value per exposure) of every unit from `unit_start`, NaN where less than
        half of it was measured, and the share of each unit measured."""
        per = self.bins_per_unit
        lead = int(round((self.start - self.unit_start) / self.step))  # bins before the data's first
        units = int(np.ceil((lead + len(self.value)) / per))
        tail = units * per - lead - len(self.value)
        value = np.concatenate([np.zeros(lead), self.value, np.zeros(tail)]).reshape(units, per).sum(axis=1)
        exposure = np.concatenate([np.zeros(lead), self.exposure, np.zeros(tail)]).reshape(units, per).sum(axis=1)
        share = exposure / (per * self.full)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(share >= 0.5, value / exposure, np.nan), share

    def mask(self, start: pd.Timestamp, end: pd.Timestamp) -> np.ndarray:
        first = int(np.ceil((start - self.start) / self.step)) if start > self.start else 0
        last = int(np.ceil((end - self.start) / self.step))
        mask = np.zeros(len(self.value), dtype=bool)
        mask[max(0, first) : max(0, min(len(mask), last))] = True
        return mask


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One event's result, or a category's (`event` = "category:<name>", `pooled` events): a
    row of `events check`."""

    event: str
    title: str
    category: str
    window_start: pd.Timestamp | None
    window_end: pd.Timestamp | None
    verdict: str
    coverage: float | None = None  # of the window's units measured
    inside_rate: float | None = None  # the window's mean at the calendar's onset
    baseline_rate: float | None = None  # the baseline's centre there
    ratio: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    q_value: float | None = None
    onset_shift_units: int | None = None  # the onset that showed the largest departure
    placebos: int | None = None
    lead_lag_hours: float | None = None
    pooled: int | None = None
    agree: int | None = None
    left_out: dict[str, list[float | None]] | None = None  # pooled: event -> [ratio, p] without it

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        for key in ("window_start", "window_end"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return out


def _duration(step: pd.Timedelta) -> str:
    return str(step).removeprefix("0 days ").removesuffix(".000000") if step < DAY else f"{step.days} days"


def outage_series(
    outages: pd.DataFrame, coverage: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp, unit: pd.Timedelta = DAY
) -> Series:
    """Outage minutes and measured minutes per bin (a 24th of the unit: hours for days).
    `coverage` holds the spans the daemon was measuring; outages only count where there was
    measuring."""
    size = unit / BINS_PER_UNIT
    start = start.floor(size)
    bins = max(1, int(np.ceil((end - start) / size)))
    edges = list(pd.date_range(start, periods=bins + 1, freq=size))
    exposure = _minutes_per_bin(list(zip(coverage.get("start", []), coverage.get("end", []), strict=True)), edges)
    down = union(zip(outages.get("start", []), outages.get("end", []), strict=True))  # something down counts once
    value = np.minimum(_minutes_per_bin(down, edges), exposure)  # unmeasured time is unknown, never outage
    return Series(
        start=start, step=size, value=value, exposure=exposure, unit=unit, full=size / pd.Timedelta(minutes=1)
    )


def _minutes_per_bin(intervals: list[tuple[pd.Timestamp, pd.Timestamp]], edges: list[pd.Timestamp]) -> np.ndarray:
    out = np.zeros(len(edges) - 1)
    start, size = edges[0], edges[1] - edges[0]
    for a, b in intervals:
        first = max(0, int((a - start) // size))
        last = min(len(out), int(np.ceil((b - start) / size)))
        for i in range(first, last):
            overlap = min(b, edges[i + 1]) - max(a, edges[i])
            out[i] += max(0.0, overlap / pd.Timedelta(minutes=1))
    return out


def hour_sums(times: pd.DatetimeIndex, values: pd.Series) -> pd.DataFrame:
    """`sum` and `count` of the values of each hour (UTC) that has one."""
    present = values.notna().to_numpy()
    frame = pd.DataFrame({"sum": values.to_numpy(dtype=float)[present], "count": 1}, index=times[present].floor("h"))
    return frame.groupby(level=0).sum()


def binned_series(hours: pd.DataFrame) -> Series:
    """A regular series from hourly sums and counts: hourly when the hours that have a value
    are mostly less than 12 hours apart, daily (UTC days) otherwise; each bin holds the mean
    of its values, a bin without one has no exposure."""
    hours = hours.sort_index()
    index = pd.DatetimeIndex(hours.index)
    usual = pd.Timedelta(pd.Series(index).diff().median())
    step = pd.Timedelta(hours=1) if usual < pd.Timedelta(hours=12) else DAY
    bins = hours if step < DAY else hours.groupby(index.floor("D")).sum()
    regular = bins.reindex(pd.date_range(bins.index[0], bins.index[-1], freq=step), fill_value=0)
    count = regular["count"].to_numpy()
    present = count > 0
    return Series(
        start=regular.index[0],
        step=step,
        value=np.where(present, regular["sum"].to_numpy() / np.maximum(count, 1), 0.0),
        exposure=present.astype(float),
    )


def external_series(frame: pd.DataFrame, column: str) -> Series:
    """A daily or hourly series from a frame of values indexed by time (analysis/series.py
    reads a CSV export into the same hourly sums, a chunk at a time)."""
    return binned_series(hour_sums(pd.DatetimeIndex(frame.index), frame[column]))


def check_events(
    series: Series,
    events: Sequence[Event],
    all_events: Sequence[Event],
    *,
    before: pd.Timedelta = pd.Timedelta(0),
    after: pd.Timedelta = pd.Timedelta(0),
    first_outages: pd.Series | None = None,
    method: Method | None = None,
    pooled: bool = False,
) -> list[Check]:
    """One Check per event (and per category with `pooled`). `all_events` are kept out of
    every baseline and placebo date (holidays included)."""
    method = method or Method(two_sided=False)
    values, share = series.per_unit()
    unit_start = series.unit_start

    def units(start: pd.Timestamp, end: pd.Timestamp) -> tuple[int, int]:
        first = int(np.ceil((start - unit_start) / series.unit))
        return first, max(1, int(np.ceil((end - unit_start) / series.unit)) - first)

    excluded = np.zeros(len(values), dtype=bool)
    for event in all_events:
        first, length = units(event.window[0] - before, event.window[1] + after)
        excluded[max(0, first) : max(0, min(len(values), first + length))] = True
    calculator = Calculator(values, excluded, method)
    checks, effects = [], []
    for event in events:
        start, end = event.window
        w_start, w_end = start - before, end + after
        first, length = units(w_start, w_end)
        effect = calculator.effect(first, length)
        inside = share[max(0, first) : max(0, first + length)]
        raw = values[max(0, first) : max(0, first + length)]
        check = Check(
            event=event.id,
            title=event.title,
            category=event.category,
            window_start=w_start,
            window_end=w_end,
            verdict="",
            coverage=round(float(inside.sum() / length), 3) if len(inside) else 0.0,
            inside_rate=float(np.nanmean(raw)) if effect.reason is None else None,
            baseline_rate=_baseline_rate(calculator, first) if effect.reason is None else None,
            ratio=effect.ratio,
            ci_low=effect.ci_low,
            ci_high=effect.ci_high,
            p_value=effect.p_value,
            onset_shift_units=effect.shift,
            placebos=effect.placebos or None,
            lead_lag_hours=_lead_lag(first_outages, w_start, w_end, start),
        )
        checks.append(check)
        effects.append(effect)
    qs = iter(q_values([e.p_value for e in effects if e.p_value is not None]))
    checks = [
        replace(
            c,
            q_value=(q := next(qs)) if e.p_value is not None else None,
            verdict=_words(e, q if e.p_value is not None else None, method, series),
        )
        for c, e in zip(checks, effects, strict=True)
    ]
    if pooled:
        checks += _categories(checks, effects, calculator, method)
    return checks


def _baseline_rate(calculator: Calculator, first: int) -> float | None:
    prep = calculator.prepared
    centre = float(prep.base[first]) if 0 <= first < len(prep.base) else float("nan")
    if np.isnan(centre):
        return None
    return float(np.exp(centre)) if prep.log else centre


def _words(effect: Effect, q: float | None, method: Method, series: Series) -> str:
    if effect.reason is not None or effect.p_value is None or q is None:
        reason = (effect.reason or "no p-value").replace("units", series.units)
        return f"not evaluable: {reason}"
    rise = (effect.effect or 0) > 0
    ratio = f"{effect.ratio:.2f}x" if effect.ratio is not None else f"{effect.effect:+.3g}, none in the baseline"
    kind = (" (spike)" if rise else " (drop)") if method.two_sided else (" (more outages)" if rise else "")
    onset = f", onset {effect.shift:+d} {series.units}" if effect.shift else ""
    if q < ALPHA:
        return f"effect: {ratio}{kind}, q = {q:.2g}{onset}"
    return f"no effect: {ratio}, q = {q:.2g}"


def _categories(checks: list[Check], effects: list[Effect], calculator: Calculator, method: Method) -> list[Check]:
    """One row per category of two or more evaluable events: its events as a whole."""
    log = calculator.prepared.log
    rows = []
    for category in dict.fromkeys(c.category for c in checks):
        departures = {
            c.event: e.nominal
            for c, e in zip(checks, effects, strict=True)
            if c.category == category and e.nominal is not None
        }
        result = pool(departures, two_sided=method.two_sided)
        if result is None:
            continue
        scale = np.exp if log else (lambda v: v)
        what = "ratio" if log else "departure"
        driven = [name for name, (_, p) in result.left_out.items() if p >= ALPHA]
        significant = result.p_value < ALPHA
        shown = f"{scale(result.mean):.2f}x" if log else f"{result.mean:+.3g}"
        if significant and driven and len(driven) <= max(1, result.events // 5):
            verdict = (
                f"effect: {shown} across {result.events} events ({result.agree} agree), p = "
                f"{result.p_value:.2g}, but driven by {', '.join(driven)}: without it, none"
            )
        elif significant:
            verdict = f"effect: {shown} across {result.events} events ({result.agree} agree), p = {result.p_value:.2g}"
        else:
            verdict = (
                f"no effect: {shown} across {result.events} events ({result.agree} agree), p = {result.p_value:.2g}"
            )
        rows.append(
            Check(
                event=f"category:{category}",
                title=f"{category}: {result.events} events as a whole ({what})",
                category=category,
                window_start=None,
                window_end=None,
                verdict=verdict,
                ratio=float(scale(result.mean)),
                ci_low=float(scale(result.ci_low)),
                ci_high=float(scale(result.ci_high)),
                p_value=result.p_value,
                pooled=result.events,
                agree=result.agree,
                left_out={name: [float(scale(mean)), p] for name, (mean, p) in result.left_out.items()},
            )
        )
    return rows


def _lead_lag(
    first_outages: pd.Series | None, w_start: pd.Timestamp, w_end: pd.Timestamp, event_start: pd.Timestamp
) -> float | None:
    if first_outages is None or not len(first_outages):
        return None
    inside = first_outages[(first_outages >= w_start) & (first_outages < w_end)]
    if not len(inside):
        return None
    return round(float((inside.min() - event_start) / pd.Timedelta(hours=1)), 2)
