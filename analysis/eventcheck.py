"""Did outages (or an external series) line up with events beyond chance?

For each event window: the rate inside (outage minutes per measured minute, or the series'
mean), the same rate over a baseline (measured time outside every event window and every
holiday), their ratio with a 95 % interval (log-normal, days as the independent units, a t quantile
for the window's few days), and a p-value from
circular shifts of the series by whole days, which keeps its autocorrelation and its daily
cycle. A verdict in words: effect, no effect, or not enough data.

The unit is a day unless told otherwise: a lab run of minutes uses seconds as its "days".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from .events import Event

ALPHA = 0.05
MIN_WINDOW_COVERAGE = 0.5  # of the window's time must be measured
MIN_BASELINE_DAYS = 7  # units, days by default
MIN_DAYS = 20  # fewer units of data and no circular shift can be significant at 5 %
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

    @property
    def bins_per_unit(self) -> int:
        return max(1, int(self.unit / self.step))

    @property
    def units(self) -> str:
        return "days" if self.unit == DAY else f"units of {_duration(self.unit)}"

    def mask(self, start: pd.Timestamp, end: pd.Timestamp) -> np.ndarray:
        first = int(np.ceil((start - self.start) / self.step)) if start > self.start else 0
        last = int(np.ceil((end - self.start) / self.step))
        mask = np.zeros(len(self.value), dtype=bool)
        mask[max(0, first) : max(0, min(len(mask), last))] = True
        return mask


@dataclass(frozen=True, slots=True)
class Check:
    event: str
    title: str
    category: str
    window_start: pd.Timestamp
    window_end: pd.Timestamp
    inside_rate: float | None
    baseline_rate: float | None
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    coverage: float
    lead_lag_hours: float | None
    verdict: str

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["window_start"] = self.window_start.isoformat()
        out["window_end"] = self.window_end.isoformat()
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
    edges = start + size * np.arange(bins + 1)
    exposure = _minutes_per_bin(list(zip(coverage.get("start", []), coverage.get("end", []), strict=True)), edges)
    value = np.minimum(_minutes_per_bin(_union(outages), edges), exposure)  # unmeasured time is unknown, never outage
    return Series(start=start, step=size, value=value, exposure=exposure, unit=unit)


def _minutes_per_bin(intervals: list[tuple[pd.Timestamp, pd.Timestamp]], edges: pd.DatetimeIndex) -> np.ndarray:
    out = np.zeros(len(edges) - 1)
    start, size = edges[0], edges[1] - edges[0]
    for a, b in intervals:
        first = max(0, int((a - start) // size))
        last = min(len(out), int(np.ceil((b - start) / size)))
        for i in range(first, last):
            overlap = min(b, edges[i + 1]) - max(a, edges[i])
            out[i] += max(0.0, overlap / pd.Timedelta(minutes=1))
    return out


def _union(outages: pd.DataFrame) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """Outage intervals of every path merged: time when something was down counts once."""
    merged: list[list[pd.Timestamp]] = []
    for o_start, o_end in sorted(zip(outages.get("start", []), outages.get("end", []), strict=True)):
        if merged and o_start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], o_end)
        else:
            merged.append([o_start, o_end])
    return [(a, b) for a, b in merged]


def hour_sums(times: pd.DatetimeIndex, values: pd.Series) -> pd.DataFrame:
    """`sum` and `count` of the values of each hour (UTC) that has one."""
    present = values.notna().to_numpy()
    frame = pd.DataFrame({"sum": values.to_numpy(dtype=float)[present], "count": 1},
                         index=times[present].floor("h"))  # fmt: skip
    return frame.groupby(level=0).sum()


def binned_series(hours: pd.DataFrame) -> Series:
    """A regular series from hourly sums and counts: hourly when the hours that have a value
    are mostly less than 12 hours apart, daily (UTC days) otherwise; each bin holds the mean
    of its values, a bin without one has no exposure."""
    hours = hours.sort_index()
    step = pd.Series(hours.index).diff().median()
    step = pd.Timedelta(hours=1) if step < pd.Timedelta(hours=12) else DAY
    bins = hours if step < DAY else hours.groupby(hours.index.floor("D")).sum()
    regular = bins.reindex(pd.date_range(bins.index[0], bins.index[-1], freq=step), fill_value=0)
    count = regular["count"].to_numpy()
    present = count > 0
    return Series(
        start=regular.index[0], step=step, value=np.where(present, regular["sum"].to_numpy() / np.maximum(count, 1), 0.0),
        exposure=present.astype(float),
    )  # fmt: skip


def external_series(frame: pd.DataFrame, column: str) -> Series:
    """A daily or hourly series from a frame of values indexed by time (analysis/series.py
    reads a CSV export into the same hourly sums, a chunk at a time)."""
    return binned_series(hour_sums(pd.DatetimeIndex(frame.index), frame[column]))


def _rate(series: Series, mask: np.ndarray) -> tuple[float, float]:
    return float(series.value[mask].sum()), float(series.exposure[mask].sum())


def _t_quantile(df: int, z: float = 1.959964) -> float:
    """Student's t quantile for a two-sided 95 % interval (Cornish-Fisher expansion)."""
    df = max(df, 1)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _log_rate_variance(series: Series, mask: np.ndarray) -> tuple[float, int]:
    """Variance of log(sum value / sum exposure) over the mask, with days as the independent
    units (the ratio estimator's delta-method variance), and the number of days."""
    day = np.arange(len(series.value)) // series.bins_per_unit
    days = np.unique(day[mask])
    v = np.bincount(day[mask], weights=series.value[mask], minlength=day.max() + 1)[days]
    e = np.bincount(day[mask], weights=series.exposure[mask], minlength=day.max() + 1)[days]
    n = len(days)
    rate = v.sum() / e.sum()
    if n < 2:
        return float("inf"), n
    residual = v - rate * e
    variance = n * residual.var(ddof=1) / e.sum() ** 2  # of the rate
    return float(variance / rate**2), n


def _interval(
    series: Series, window: np.ndarray, baseline: np.ndarray, ratio: float
) -> tuple[float, float] | tuple[None, None]:
    """95 % interval of the ratio: log-normal, t quantile on the window's days (the fewer).
    None when the window spans a single day: one day has no spread to go on."""
    var_in, days_in = _log_rate_variance(series, window)
    var_base, _ = _log_rate_variance(series, baseline)
    if not np.isfinite(var_in + var_base):
        return None, None
    half = _t_quantile(days_in - 1) * float(np.sqrt(var_in + var_base))
    return float(ratio * np.exp(-half)), float(ratio * np.exp(half))


SHIFT_BLOCK = 1 << 20  # (shift, window bin) pairs gathered at once


def _permutation_p(series: Series, window: np.ndarray, two_sided: bool) -> float | None:
    """Shift the series circularly by whole days; how often is the window's rate as extreme?

    Only the window's bins are gathered for each shift (never the whole series rolled), so a
    long hourly series costs days x window bins per event; the unshifted window is gathered
    the same way, so a shift that repeats it exactly ties exactly."""
    per_day = series.bins_per_unit
    days = len(series.value) // per_day
    if days < 2:
        return None
    base_rate = series.value.sum() / max(series.exposure.sum(), 1e-12)
    bins = np.flatnonzero(window)
    shifts = np.arange(days) * per_day  # 0, the window itself, first
    v, e = np.empty(days), np.empty(days)
    block = max(1, SHIFT_BLOCK // max(len(bins), 1))
    for at in range(0, days, block):
        where = (bins[None, :] - shifts[at : at + block, None]) % len(series.value)
        v[at : at + block] = series.value[where].sum(axis=1)
        e[at : at + block] = series.exposure[where].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = v / e
    if two_sided:
        stat = np.abs(np.log((rate + 1e-9) / (base_rate + 1e-9)))
    else:
        stat = rate
    counted = e[1:] > 0
    total = int(counted.sum())
    extreme = int((stat[1:][counted] >= stat[0]).sum())
    return None if total == 0 else (1 + extreme) / (1 + total)


def check_events(
    series: Series,
    events: Sequence[Event],
    all_events: Sequence[Event],
    *,
    before: pd.Timedelta = pd.Timedelta(0),
    after: pd.Timedelta = pd.Timedelta(0),
    first_outages: pd.Series | None = None,
    two_sided: bool = False,
) -> list[Check]:
    """One Check per event. `all_events` are kept out of the baseline (holidays included)."""
    excluded = np.zeros(len(series.value), dtype=bool)
    for event in all_events:
        start, end = event.window
        excluded |= series.mask(start - before, end + after)
    measured = series.exposure > 0
    baseline = measured & ~excluded
    data_days = int(series.exposure.astype(bool).sum() // series.bins_per_unit)
    base_days = len(np.unique(np.flatnonzero(baseline) // series.bins_per_unit))
    checks = []
    for event in events:
        start, end = event.window
        w_start, w_end = start - before, end + after
        window = series.mask(w_start, w_end) & measured
        length = (w_end - w_start) / series.step
        coverage = float(window.sum() / length) if length > 0 else 0.0
        lead = _lead_lag(first_outages, w_start, w_end, start)
        common = dict(event=event.id, title=event.title, category=event.category, window_start=w_start,
                      window_end=w_end, coverage=round(coverage, 3), lead_lag_hours=lead)  # fmt: skip
        reason = None
        if coverage < MIN_WINDOW_COVERAGE:
            reason = f"not enough data: {coverage:.0%} of the window measured"
        elif base_days < MIN_BASELINE_DAYS:
            reason = f"not enough data: {base_days} baseline {series.units} (need {MIN_BASELINE_DAYS})"
        elif data_days < MIN_DAYS:
            reason = (f"not enough data: {data_days} {series.units} measured (need {MIN_DAYS} for a p-value "
                      "under 5 %)")  # fmt: skip
        if reason:
            checks.append(Check(**common, inside_rate=None, baseline_rate=None, ratio=None, ci_low=None,
                                ci_high=None, p_value=None, verdict=reason))  # fmt: skip
            continue
        inside, base = _rate(series, window), _rate(series, baseline)
        rate_in, rate_base = inside[0] / inside[1], base[0] / base[1]
        p = _permutation_p(series, window, two_sided)
        ratio: float | None = None
        low = high = None
        if rate_in > 0 and rate_base > 0:
            ratio = rate_in / rate_base
            low, high = _interval(series, window, baseline, ratio)
        elif rate_in == 0 and rate_base > 0:
            ratio = 0.0
        checks.append(Check(
            **common, inside_rate=rate_in, baseline_rate=rate_base, ratio=ratio, ci_low=low, ci_high=high,
            p_value=p, verdict=_words(rate_in, rate_base, ratio, low, high, p, two_sided),
        ))  # fmt: skip
    return checks


def _lead_lag(first_outages: pd.Series | None, w_start: pd.Timestamp, w_end: pd.Timestamp,
              event_start: pd.Timestamp) -> float | None:  # fmt: skip
    if first_outages is None or not len(first_outages):
        return None
    inside = first_outages[(first_outages >= w_start) & (first_outages < w_end)]
    if not len(inside):
        return None
    return round((inside.min() - event_start) / pd.Timedelta(hours=1), 2)


def _words(rate_in: float, rate_base: float, ratio: float | None, low: float | None, high: float | None,
           p: float | None, two_sided: bool, units: str = "days") -> str:  # fmt: skip
    significant = p is not None and p < ALPHA
    if rate_in == 0 and rate_base == 0:
        return "no effect: nothing inside the window or in the baseline"
    if ratio is None:  # something inside, nothing in the baseline
        return "effect: only inside the window, none in the baseline" if significant else (
            "no effect: none in the baseline, but as much at other times of the data")
    if significant and low is None:  # too few days in the window for an interval
        direction = (" (a spike)" if ratio > 1 else " (a drop)") if two_sided else ""
        return f"effect: {ratio:.2f}x the baseline{direction}, too few {units} for an interval"
    if significant and low is not None and low > 1:
        return f"effect: {ratio:.1f}x the baseline" + (" (a spike)" if two_sided else "")
    if significant and high is not None and high < 1:
        return f"effect: {ratio:.2f}x the baseline" + (" (a drop)" if two_sided else " (fewer outages)")
    return "no effect: within the baseline's range"
