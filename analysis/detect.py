"""Where does a series depart from its local baseline? Found without being told the dates,
then held against the calendar with the chance of such a match.

Pure functions over a pandas Series with a DatetimeIndex (NaN for a missing value). Two
methods:

- `baseline` (the default), in the spirit of IODA's detectors: each value is compared with
  the median of the BASELINE available values before it (28 days of a daily series, missing
  days left out; at least MIN_HISTORY of them, or the value is not judged), scaled by their
  MAD (normal-consistent, / 0.6745: a robust z). A value beyond THRESHOLD is flagged and
  enters later baselines clipped to the threshold: one spike neither hides the next nor
  widens the baseline, and a lasting shift
  becomes the new baseline within about one BASELINE (half of it for a shift of ten robust
  standard deviations). A signal is a run of at least
  MIN_RUN flagged values in a row on the same side (missing values are skipped). Against a
  flat baseline (MAD 0, e.g. no outage for weeks) any difference counts. On Gaussian white
  noise it gives about one false signal per NOISE_UNITS_PER_SIGNAL values (tests/test_detect.py
  holds it to that).
- `mann-kendall`, the framework of the ACSAC 2024 paper "I Can Show You the World (of
  Censorship)": Mann-Kendall tests on windows of MK_WINDOW values sliding by one (the test
  sees the first MK_WINDOW - 1; the window ends on the last), and a control chart on each
  window's first value, whose limits are set after CC_CALM consecutive no-trend windows and
  set again after CC_OUT consecutive values beyond the same limit. A signal is a run of
  windows with the same label (one other label inside a run does not end it; runs of one
  window are dropped), dated by the first values of its first and last windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import pandas as pd

from .events import BEIJING, Event

BASELINE = 28  # available values before the one judged
MIN_HISTORY = 14  # of them, before a value is judged
THRESHOLD = 3.5  # robust z; Iglewicz and Hoaglin's cut-off for outliers
MIN_RUN = 2  # flagged values in a row
NOISE_UNITS_PER_SIGNAL = 8000  # 60 signals in 500,000 values of Gaussian white noise (25 seeds)

MK_WINDOW = 10
MK_ALPHA = 0.05
CC_CALM = 20  # no-trend windows before control limits are set
CC_OUT = 5  # values in a row beyond one limit before they are set again
CC_GROUP = 5  # block averages: the calm values' subgroups, as the paper has them
C4 = 0.9727  # the paper's constant: X̄ ± 3·s̄ / (C4·√CC_GROUP)
D2 = 1.128  # moving ranges of two values: X̄ ± 3·MR̄ / D2

KINDS = ("increasing", "decreasing", "above", "below")


@dataclass(frozen=True, slots=True)
class Signal:
    start: pd.Timestamp
    end: pd.Timestamp
    kind: str  # one of KINDS
    length: int  # values (baseline) or windows (mann-kendall) in the run
    through: pd.Timestamp  # the last value the signal rests on (mann-kendall: its last window's end)
    peak_value: float | None = None  # baseline: the value furthest out, its baseline and robust z
    peak_baseline: float | None = None
    peak_z: float | None = None  # None: against a flat baseline (MAD 0)


def block_average(series: pd.Series, n: int) -> pd.Series:
    """Means of n consecutive available values (the last block may be shorter), each dated
    by its first value: the paper's smoothing of counts."""
    values = series.dropna()
    means = values.groupby(np.arange(len(values)) // n).mean()
    return pd.Series(means.to_numpy(), index=values.index[::n], name=series.name)


def runs(labels: Sequence[str], kind: str, *, gap: int, min_length: int) -> list[tuple[int, int]]:
    """First and last positions of the runs of `kind`: up to `gap` other labels in a row
    inside a run do not end it; runs shorter than `min_length` are dropped."""
    found: list[tuple[int, int]] = []
    first = last = -1
    for i, label in enumerate(labels):
        if label == kind:
            first, last = (i if first < 0 else first), i
        elif first >= 0 and i - last > gap:
            found.append((first, last))
            first = -1
    if first >= 0:
        found.append((first, last))
    return [(a, b) for a, b in found if b - a + 1 >= min_length]


# --- the baseline detector


def robust_z(
    series: pd.Series, *, threshold: float = THRESHOLD, window: int = BASELINE, min_history: int = MIN_HISTORY
) -> pd.DataFrame:
    """Per available value: its baseline (median of the `window` values before it), the
    robust scale (normal-consistent MAD) and z. z is NaN while the history is short, ±inf
    against a flat baseline."""
    from statsmodels.robust.scale import mad  # normal-consistent: the MAD / 0.6745

    values = series.dropna()
    x = values.to_numpy(float)
    kept = x.copy()  # what later baselines see: flagged values clipped to the threshold
    base, scale, z = (np.full(len(x), np.nan) for _ in range(3))
    for i in range(len(x)):
        history = kept[max(0, i - window) : i]
        if len(history) < min_history:
            continue
        base[i] = np.median(history)
        scale[i] = mad(history, center=base[i])
        if scale[i] > 0:
            z[i] = (x[i] - base[i]) / scale[i]
        else:
            z[i] = np.sign(x[i] - base[i]) * np.inf if x[i] != base[i] else 0.0
        kept[i] = np.clip(x[i], base[i] - threshold * scale[i], base[i] + threshold * scale[i])
    return pd.DataFrame({"value": x, "baseline": base, "scale": scale, "z": z}, index=values.index)


def baseline_signals(series: pd.Series, *, threshold: float = THRESHOLD, min_run: int = MIN_RUN) -> list[Signal]:
    scored = robust_z(series, threshold=threshold)
    labels = np.where(scored["z"] > threshold, "above", np.where(scored["z"] < -threshold, "below", ""))
    signals = []
    for kind in ("above", "below"):
        for a, b in runs(labels.tolist(), kind, gap=0, min_length=min_run):
            run = scored.iloc[a : b + 1]
            peak = run.iloc[int(np.argmax(np.abs(run["z"].to_numpy())))]
            signals.append(
                Signal(
                    start=run.index[0],
                    end=run.index[-1],
                    kind=kind,
                    length=b - a + 1,
                    through=run.index[-1],
                    peak_value=float(peak["value"]),
                    peak_baseline=float(peak["baseline"]),
                    peak_z=float(peak["z"]) if np.isfinite(peak["z"]) else None,
                )
            )
    return sorted(signals, key=lambda s: (s.start, s.kind))


# --- the ACSAC 2024 framework


def mann_kendall_windows(series: pd.Series, alpha: float = MK_ALPHA) -> pd.DataFrame:
    """One row per window position: its start and end dates, its first value and the trend
    the Mann-Kendall test finds in its first MK_WINDOW - 1 values."""
    import pymannkendall

    values = series.dropna()
    x = values.to_numpy(float)
    count = max(0, len(x) - MK_WINDOW + 1)
    trends = [pymannkendall.original_test(x[i : i + MK_WINDOW - 1], alpha=alpha).trend for i in range(count)]
    return pd.DataFrame(
        {"start": values.index[:count], "end": values.index[MK_WINDOW - 1 :], "value": x[:count], "trend": trends}
    )


def control_limits(calm: pd.Series, chart: str) -> tuple[float, float]:
    """Lower and upper limits from the calm windows' first values: an X̄ chart of block
    averages (`averages`) or an individuals/moving-range chart (`individuals`)."""
    if chart == "averages":
        s_bar = calm.groupby(np.arange(len(calm)) // CC_GROUP).std().mean()
        half = 3 * s_bar / (C4 * np.sqrt(CC_GROUP))
    else:
        half = 3 * calm.diff().abs().mean() / D2
    return calm.mean() - half, calm.mean() + half


def control_chart(windows: pd.DataFrame, chart: str) -> list[str]:
    """Per window: `waiting` (no limits yet), `within`, `above` or `below`."""
    labels = []
    limits: tuple[float, float] | None = None
    calm: list[float] = []
    side, streak = "", 0
    for value, trend in zip(windows["value"], windows["trend"], strict=True):
        if limits is None:
            calm = [*calm, value] if trend == "no trend" else []
            if len(calm) == CC_CALM:
                limits, calm, streak = control_limits(pd.Series(calm), chart), [], 0
        if limits is None:
            labels.append("waiting")
            continue
        now = "above" if value > limits[1] else "below" if value < limits[0] else "within"
        streak = 0 if now == "within" else streak + 1 if now == side else 1
        side = now
        labels.append(now)
        if streak == CC_OUT:
            limits = None
    return labels


def mann_kendall_signals(series: pd.Series, chart: str) -> list[Signal]:
    windows = mann_kendall_windows(series)
    chart_labels = control_chart(windows, chart)
    signals = []
    for kind, labels in (
        ("increasing", windows["trend"].tolist()),
        ("decreasing", windows["trend"].tolist()),
        ("above", chart_labels),
        ("below", chart_labels),
    ):
        for a, b in runs(labels, kind, gap=1, min_length=2):
            signals.append(
                Signal(
                    start=windows["start"].iloc[a],
                    end=windows["start"].iloc[b],
                    kind=kind,
                    length=b - a + 1,
                    through=windows["end"].iloc[b],
                )
            )
    return sorted(signals, key=lambda s: (s.start, KINDS.index(s.kind)))


# --- the calendar


def event_days(event: Event) -> tuple[date, date]:
    """The Beijing dates an event covers, first and last."""
    start, end = event.window
    return start.tz_convert(BEIJING).date(), (end - pd.Timedelta(1)).tz_convert(BEIJING).date()


def events_near(day: date, events: Sequence[Event], within_days: int) -> list[str]:
    near = timedelta(days=within_days)
    return [e.id for e in events if event_days(e)[0] - near <= day <= event_days(e)[1] + near]


def base_rate(first: date, last: date, events: Sequence[Event], within_days: int) -> float:
    """The share of the days first..last that lie within `within_days` of some event: the
    chance that a signal starting on a day drawn at random matches one."""
    days = pd.date_range(first, last, freq="D")
    if not len(days):
        return 0.0
    near = pd.Timedelta(days=within_days)
    covered = np.zeros(len(days), dtype=bool)
    for event in events:
        a, b = (pd.Timestamp(d) for d in event_days(event))
        covered |= (days >= a - near) & (days <= b + near)
    return float(covered.mean())
