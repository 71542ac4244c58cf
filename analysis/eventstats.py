"""Did a series depart from its local baseline in an event's window, beyond what its own
ordinary dates show? The statistics behind `tunnelwatch events check`, on a regular series
of units (days unless told otherwise), missing units as NaN.

The baseline of a window is the `baseline` most recent usable units that end `gap` units
before it (looking back at most `lookback` baselines to find them), leaving out every
event's window, the holidays and missing units, on the log scale when the series is
positive. It is read from a cleaned copy of the series in which a value far from the
running median of the units before it (beyond `clip_k` robust standard deviations) is put
back to that median, for at most `clip_units` in a row, as IODA's detector inpaints its
history: one earlier spike cannot hide the next, a new level is accepted after a week, and
the baseline's mean is a winsorised one. (Only on the log scale: in a series of outage
shares, mostly zero, every outage is part of the base rate.) A departure (window mean minus baseline) is
measured in units of the series' robust spread of departures over the year around it.

The onset may differ from the calendar's: the window is tried moved by every unit in
`shifts` (a later onset keeps the calendar's baseline), and the largest departure is the
event's statistic. Its p-value compares it with the same statistic at placebo dates, every
window at least `placebo_gap` units from every event and holiday, so the search is paid
for and the null is the series' own. Placebo dates near each other are alike; an event has
none near it, so its raw rank would flatter it: the p-value is calibrated on the ranks the
placebo dates get with their own neighbours left out the same way. The 95 % interval is the
departure minus the placebo dates' 2.5-97.5 % range of departures, scaled to this one's.
Calibration is tested (tests/test_eventstats.py): 1.5x over 7 days at 20 % day-to-day
noise is found in at least 90 % of series, ordinary dates are flagged at the nominal 5 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd

Scale = Literal["auto", "log", "linear"]
MIN_PLACEBOS = 19  # the fewest placebo dates with which a p-value can reach 0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class Method:
    baseline: int = 28  # units in the baseline
    gap: int = 7  # units between the baseline's end and the window
    lookback: int = 3  # baselines' lengths the baseline may reach back to find its usable units
    spread_window: int = 365  # units over which the scale of departures is measured
    shifts: tuple[int, int] = (-3, 14)  # onsets tried, in units from the window's start
    placebo_gap: int = 30  # placebo windows keep this far from every event and holiday
    min_share: float = 0.5  # of a window's units, and of the baseline's, that must be there
    scale: Scale = "auto"
    seasonal: tuple[int, ...] = ()  # periods in units removed first (statsmodels MSTL), e.g. (7,) for days
    two_sided: bool = True  # a spike or a drop; False: only a rise (outage minutes)
    clip_k: float = 3.0
    clip_units: int = 7


@dataclass(frozen=True, slots=True, kw_only=True)
class Effect:
    """One event window's result: `reason` says why it could not be evaluated, else the
    departure `effect` on the analysis scale (a log-ratio on the log scale), as a `ratio`
    with its interval, the onset `shift` that showed it and its placebo p-value."""

    reason: str | None = None
    effect: float | None = None
    nominal: float | None = None  # the departure at the calendar's onset less the placebo dates' median one
    ratio: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    shift: int | None = None
    placebos: int = 0
    window_present: int = 0
    baseline_present: int = 0


@dataclass(frozen=True, slots=True)
class Prepared:
    y: np.ndarray  # the series on the analysis scale, seasonality removed, NaN where missing
    log: bool
    base: np.ndarray  # per window start: the baseline's centre (NaN where too little)
    spread: np.ndarray  # the robust standard deviation of departures around t (never below a tenth of the series')
    base_count: np.ndarray  # per window start: baseline units present


def prepare(values: np.ndarray, excluded: np.ndarray, method: Method) -> Prepared:
    """The series on its scale, the cleaned copy and every window start's baseline."""
    present = values[~np.isnan(values)]
    log = method.scale == "log" or (method.scale == "auto" and len(present) > 0 and bool((present > 0).all()))
    if log and len(present) and (present <= 0).any():
        raise ValueError(f"a log scale needs positive values; the series has {int((present <= 0).sum())} at or below 0")
    y = np.log(values) if log else values.astype(float)
    if method.seasonal and len(present):
        y = y - _seasonal(y, method.seasonal)
    clean = _inpainted(y, method) if log else y.copy()  # shares of outage time: every outage is the base rate
    clean[excluded] = np.nan
    base, count = _baselines(clean, method)
    spread = _spread(y - base, method.spread_window)
    floor = 0.1 * _robust_sd(y[~np.isnan(y)])  # a flat baseline (no outages at all) still has a scale
    return Prepared(y=y, log=log, base=base, spread=np.fmax(spread, floor if floor > 0 else 1e-9), base_count=count)


def _robust_sd(values: np.ndarray) -> float:
    if not len(values):
        return 0.0
    mad = float(np.median(np.abs(values - np.median(values)))) * 1.4826
    return mad if mad > 0 else float(values.std())


def _baselines(clean: np.ndarray, method: Method) -> tuple[np.ndarray, np.ndarray]:
    """Per window start t: the mean of the `baseline` most recent usable units of the
    inpainted series before t - gap (looking back at most `lookback` baselines) and their
    count. Inpainting has already put far values back to the running median, so the mean is
    a winsorised one: robust, and more efficient than the median."""
    usable = np.flatnonzero(~np.isnan(clean))
    ends = np.arange(len(clean)) - method.gap
    hi = np.searchsorted(usable, ends)  # usable units before t - gap: values[:hi]
    lo = np.maximum(hi - method.baseline, np.searchsorted(usable, ends - method.lookback * method.baseline))
    count = hi - lo
    sums = np.concatenate([[0.0], np.cumsum(clean[usable])])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (sums[hi] - sums[lo]) / count, np.nan), count


def _spread(residual: np.ndarray, window: int) -> np.ndarray:
    """The robust standard deviation of the departures from the baseline (1.4826 times their
    median absolute value) over a centred window of units, a year of days by default: a
    scale that follows a series whose noise changes over the years, yet is not itself noisy."""
    absolute = pd.Series(np.abs(residual))
    spread = absolute.rolling(window, min_periods=min(window, 28), center=True).median() * 1.4826
    return spread.bfill().ffill().to_numpy()


def _seasonal(y: np.ndarray, periods: tuple[int, ...]) -> np.ndarray:
    from statsmodels.tsa.seasonal import MSTL

    if len(y) < 2 * max(periods) + 1:
        raise ValueError(f"seasonal periods {periods} need at least {2 * max(periods) + 1} units of data")
    filled = pd.Series(y).interpolate(limit_direction="both").to_numpy()
    seasonal = MSTL(filled, periods=list(periods)).fit().seasonal
    return np.asarray(seasonal if seasonal.ndim == 1 else seasonal.sum(axis=1))


def _inpainted(y: np.ndarray, method: Method) -> np.ndarray:
    """Values far from the running median of the baseline's length before them become that
    median, for at most `clip_units` in a row."""
    series = pd.Series(y)
    before = series.rolling(method.baseline, min_periods=min(method.baseline, max(3, method.baseline // 4)))
    predicted = before.median().shift(1)
    distance = (series - predicted).abs().rolling(method.baseline, min_periods=min(3, method.baseline))
    spread = distance.median().shift(1) * 1.4826
    far = ((series - predicted).abs() > method.clip_k * spread.clip(lower=1e-9)).to_numpy()
    run = pd.Series(far).groupby((~pd.Series(far)).cumsum()).cumsum().to_numpy()  # length of the run so far
    replace = far & (run <= method.clip_units)
    out = y.copy()
    out[replace] = predicted.to_numpy()[replace]
    return out


def _window_means(y: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Per start t: the mean of y over [t, t + length) and how many units are there."""
    have = ~np.isnan(y)
    sums = np.concatenate([[0.0], np.cumsum(np.where(have, y, 0.0))])
    counts = np.concatenate([[0], np.cumsum(have)])
    n = len(y)
    starts = np.arange(n)
    ends = np.minimum(starts + length, n)
    count = counts[ends] - counts[starts]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums[ends] - sums[starts]) / count
    mean[ends - starts < length] = np.nan  # a window running past the data
    return mean, count


@dataclass(frozen=True, slots=True)
class _Windows:
    """Every window start's searched statistic, its signed departure and onset shift, and
    the departure at the calendar's onset, for one window length (NaN: not evaluable)."""

    statistic: np.ndarray
    departure: np.ndarray
    standard: np.ndarray  # the departure in units of the spread
    shift: np.ndarray
    nominal: np.ndarray  # the departure at the calendar's onset


def _shifted(values: np.ndarray, by: int) -> np.ndarray:
    """values[t + by] at t (NaN past the ends)."""
    out = np.full(len(values), np.nan)
    lo, hi = max(0, -by), min(len(values), len(values) - by)
    out[lo:hi] = values[lo + by : hi + by]
    return out


class Calculator:
    """Effects of windows of one series; placebo distributions kept per window length."""

    def __init__(self, values: np.ndarray, excluded: np.ndarray, method: Method) -> None:
        self.method = method
        self.prepared = prepare(values, excluded, method)
        self.n = len(values)
        gap = method.placebo_gap
        events = np.concatenate([[0], np.cumsum(excluded)])
        at = np.arange(len(values))
        near = events[np.minimum(at + gap + 1, len(values))] - events[np.maximum(at - gap, 0)] > 0
        self._near = np.concatenate([[0], np.cumsum(near)])  # units near an event, cumulated
        self._windows: dict[int, _Windows] = {}
        self._placebos: dict[int, np.ndarray] = {}
        self._null_p: dict[int, np.ndarray] = {}
        self._sorted_stats: dict[int, np.ndarray] = {}

    def windows(self, length: int) -> _Windows:
        if length in self._windows:
            return self._windows[length]
        m, prep = self.method, self.prepared
        mean, count = _window_means(prep.y, length)
        mean[count < m.min_share * length] = np.nan
        base = np.where(prep.base_count >= m.min_share * m.baseline, prep.base, np.nan)

        def departure_at(onset: int) -> np.ndarray:
            """The window moved by `onset` against its baseline. A later onset keeps the
            calendar's baseline (never one holding the window itself); an earlier one takes
            the baseline before it."""
            moved: np.ndarray = _shifted(mean, onset) - _shifted(base, min(onset, 0))
            return moved

        nominal = departure_at(0)
        statistic, departure = np.full(self.n, -np.inf), np.full(self.n, np.nan)
        standard, shift = np.full(self.n, np.nan), np.zeros(self.n, dtype=int)
        for onset in range(m.shifts[0], m.shifts[1] + 1):
            here = departure_at(onset)
            scaled = here / _shifted(prep.spread, onset)
            value = np.abs(scaled) if m.two_sided else scaled
            better = value > statistic  # False where NaN
            statistic[better], departure[better], standard[better], shift[better] = (
                value[better],
                here[better],
                scaled[better],
                onset,
            )
        statistic[np.isnan(nominal)] = np.nan  # the calendar's own onset must be evaluable
        self._windows[length] = _Windows(
            statistic=statistic, departure=departure, standard=standard, shift=shift, nominal=nominal
        )
        return self._windows[length]

    def placebos(self, length: int) -> np.ndarray:
        """The window starts that are placebo dates for this length: windows at least
        `placebo_gap` units from every event (their baselines follow the same rule as an
        event's, leaving events out)."""
        if length not in self._placebos:
            starts = np.arange(self.n)
            hi = np.clip(starts + length, 0, self.n)
            clear = (self._near[hi] - self._near[starts]) == 0
            self._placebos[length] = np.flatnonzero(clear & ~np.isnan(self.windows(length).statistic))
        return self._placebos[length]

    def _raw_p(self, length: int, statistic: float) -> float:
        """How often placebo dates reach `statistic`."""
        stats = self._sorted(length)
        return (1 + len(stats) - int(np.searchsorted(stats, statistic - 1e-12))) / (1 + len(stats))

    def _sorted(self, length: int) -> np.ndarray:
        if length not in self._sorted_stats:
            self._sorted_stats[length] = np.sort(self.windows(length).statistic[self.placebos(length)])
        return self._sorted_stats[length]

    def null_p(self, length: int) -> np.ndarray:
        """The p-value every placebo date would get as an event, sorted: its own neighbours
        (those an event's rule would keep out) left out of its comparison, as an event's are.
        Left out, a date's neighbours would make any date look unusual; calibrating an event's
        p-value on these corrects for it."""
        if length not in self._null_p:
            placebos = self.placebos(length)
            stats, everyone = self.windows(length).statistic[placebos], self._sorted(length)
            above = len(everyone) - np.searchsorted(everyone, stats - 1e-12)
            reach = self.method.placebo_gap + length
            lo, hi = np.searchsorted(placebos, placebos - reach + 1), np.searchsorted(placebos, placebos + reach)
            width = int((hi - lo).max()) if len(placebos) else 0
            padded = np.concatenate([stats, np.full(width, -np.inf)])
            near_above = np.zeros(len(placebos), dtype=int)
            for rows in range(0, len(placebos), 4096):  # bounded memory for long hourly series
                part = slice(rows, rows + 4096)
                band = padded[lo[part, None] + np.arange(width)[None, :]]
                inside = np.arange(width)[None, :] < (hi - lo)[part, None]
                near_above[part] = ((band >= stats[part, None] - 1e-12) & inside).sum(axis=1)
            total = len(everyone) - (hi - lo)
            enough = total >= MIN_PLACEBOS  # a date with too few far from it has no p-value to give
            self._null_p[length] = np.sort((1 + above - near_above)[enough] / (1 + total)[enough])
        return self._null_p[length]

    def effect(self, first: int, length: int) -> Effect:
        m, prep = self.method, self.prepared
        if first < 0 or first + length > self.n:
            return Effect(reason="the window is not all inside the data")
        present = int((~np.isnan(prep.y[first : first + length])).sum())
        counted = Effect(window_present=present, baseline_present=int(prep.base_count[first]))
        if present < m.min_share * length:
            return replace(counted, reason=f"{length - present} of {length} window units missing")
        if counted.baseline_present < m.min_share * m.baseline:
            missing = m.baseline - counted.baseline_present
            return replace(counted, reason=f"{missing} of {m.baseline} baseline units missing or excluded")
        w, placebos = self.windows(length), self.placebos(length)
        if len(placebos) < MIN_PLACEBOS:
            return replace(
                counted,
                reason=f"{len(placebos)} placebo dates {m.placebo_gap} units from every event (need {MIN_PLACEBOS})",
            )
        if len(self.null_p(length)) < MIN_PLACEBOS:
            return replace(
                counted,
                reason=f"{len(placebos)} placebo dates, too close together to calibrate a p-value: fewer "
                f"than {MIN_PLACEBOS} have {MIN_PLACEBOS} others {m.placebo_gap} units away",
            )
        statistic, departure = float(w.statistic[first]), float(w.departure[first])
        null = self.null_p(length)
        p = (1 + int(np.searchsorted(null, self._raw_p(length, statistic) + 1e-12))) / (1 + len(null))
        shift = int(w.shift[first])
        spread = float(prep.spread[first + shift])  # the placebos' spread of departures, searched as this one was
        high_q, low_q = np.quantile(w.standard[placebos], [0.975, 0.025]) * spread
        predicted = float(np.nanmean(prep.y[first + shift : first + shift + length])) - departure
        ratio, ci_low, ci_high = (self._ratio(predicted, v) for v in (departure, departure - high_q, departure - low_q))
        nominal = float(w.nominal[first] - np.median(w.nominal[placebos]))  # centred: the series' own drift out
        return replace(
            counted,
            effect=departure,
            nominal=nominal,
            ratio=ratio,
            ci_low=ci_low,
            ci_high=ci_high,
            p_value=p,
            shift=shift,
            placebos=len(placebos),
        )

    def _ratio(self, predicted: float, departure: float) -> float | None:
        """A departure as a ratio to the baseline's prediction."""
        if self.prepared.log:
            return float(np.exp(departure))
        return (predicted + departure) / predicted if predicted > 0 else None


def q_values(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (scipy)."""
    if not p_values:
        return []
    from scipy.stats import false_discovery_control

    return [float(q) for q in false_discovery_control(np.asarray(p_values, dtype=float), method="bh")]


@dataclass(frozen=True, slots=True, kw_only=True)
class Pooled:
    """A category's events as a whole: the mean of their nominal departures (each less its
    placebo dates' median one), a t interval and p-value from the spread between events, how
    many events lean the same way, and the mean and p-value with each event left out."""

    events: int
    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    agree: int
    left_out: dict[str, tuple[float, float]]  # event -> (mean, p) without it


def pool(departures: dict[str, float], two_sided: bool = True) -> Pooled | None:
    from scipy import stats

    names = list(departures)
    values = np.array([departures[n] for n in names], dtype=float)
    if len(values) < 2:
        return None
    alternative = "two-sided" if two_sided else "greater"

    def test(sample: np.ndarray) -> tuple[float, float]:
        if len(sample) < 2 or not sample.std():
            return float(sample.mean()), 1.0
        return float(sample.mean()), float(stats.ttest_1samp(sample, 0.0, alternative=alternative).pvalue)

    mean, p = test(values)
    sem = float(values.std(ddof=1) / np.sqrt(len(values)))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sem
    agree = int((np.sign(values) == np.sign(mean)).sum()) if mean else 0
    left_out = {name: test(np.delete(values, i)) for i, name in enumerate(names)}
    return Pooled(
        events=len(values),
        mean=mean,
        ci_low=mean - half,
        ci_high=mean + half,
        p_value=p,
        agree=agree,
        left_out=left_out,
    )
