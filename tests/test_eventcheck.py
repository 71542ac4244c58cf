"""Event statistics on synthetic series where the answer is known."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest

from analysis.eventcheck import Series, check_events, external_series, outage_series
from analysis.events import Event

YEAR = pd.Timestamp("2018-01-01", tz="UTC")
HOURS = 365 * 24


def events(count: int, days: int = 7, first: date = date(2018, 2, 1), every: int = 50) -> list[Event]:
    return [
        Event(id=f"e{i}", title=f"event {i}", category="policy", start=first + timedelta(days=every * i),
              end=first + timedelta(days=every * i + days - 1))
        for i in range(count)
    ]  # fmt: skip


def synthetic(windows: list[Event], p_base: float, p_in: float, seed: int) -> Series:
    """Hourly: each measured hour has an outage of 30 minutes with probability p (p_in inside
    the event windows), so the true rate ratio is p_in / p_base."""
    rng = np.random.default_rng(seed)
    series = Series(start=YEAR, step=pd.Timedelta(hours=1), value=np.zeros(HOURS), exposure=np.full(HOURS, 60.0))
    inside = np.zeros(HOURS, dtype=bool)
    for event in windows:
        inside |= series.mask(*event.window)
    p = np.where(inside, p_in, p_base)
    value = np.where(rng.random(HOURS) < p, 30.0, 0.0)
    return Series(start=YEAR, step=series.step, value=value, exposure=series.exposure)


def test_a_planted_effect_is_found_and_its_interval_covers_the_truth() -> None:
    windows = events(6)
    checks = check_events(synthetic(windows, p_base=0.02, p_in=0.4, seed=1), windows, windows)
    for check in checks:
        assert check.verdict.startswith("effect"), check
        assert check.p_value is not None and check.p_value < 0.05
        assert check.ci_low is not None and check.ci_high is not None
        assert check.ci_low <= 20 <= check.ci_high, check  # the true ratio: 0.4 / 0.02


def test_minutes_as_units_give_the_answers_days_give() -> None:
    """A lab run of minutes: the same series, with a day shrunk to a minute, checked with
    minutes as the unit, gives the same ratios, intervals and p-values."""
    windows = events(6)
    daily = synthetic(windows, p_base=0.02, p_in=0.4, seed=1)
    shrink = 1440

    def small(t: pd.Timestamp) -> pd.Timestamp:
        return YEAR + (t - YEAR) / shrink

    minute = pd.Timedelta(minutes=1)
    series = Series(start=YEAR, step=daily.step / shrink, value=daily.value / shrink, exposure=daily.exposure / shrink,
                    unit=minute)  # fmt: skip
    scaled = [Event(id=e.id, title=e.title, category=e.category, start=small(e.window[0]).to_pydatetime(),
                    end=small(e.window[1]).to_pydatetime()) for e in windows]  # fmt: skip
    for day, fast in zip(check_events(daily, windows, windows), check_events(series, scaled, scaled), strict=True):
        assert fast.verdict == day.verdict
        assert (fast.ratio, fast.ci_low, fast.ci_high, fast.p_value) == pytest.approx(
            (day.ratio, day.ci_low, day.ci_high, day.p_value))
    measured = np.arange(960) >= 600  # 40 minutes, the first 25 not measured
    short = Series(start=YEAR, step=series.step, value=np.where(measured, series.value[:960], 0),
                   exposure=np.where(measured, series.exposure[:960], 0), unit=minute)  # fmt: skip
    (check,) = check_events(short, scaled[:1], scaled)
    assert check.verdict.startswith("not enough data") and "units of 00:01:00" in check.verdict


def test_pure_noise_gives_no_effect() -> None:
    windows = events(6)
    for seed in range(3):
        checks = check_events(synthetic(windows, p_base=0.1, p_in=0.1, seed=seed), windows, windows)
        assert [c.verdict for c in checks] == ["no effect: within the baseline's range"] * 6
        assert all(c.p_value is not None and c.p_value >= 0.05 for c in checks)


def test_a_window_without_measurements_says_so() -> None:
    windows = events(2)
    series = synthetic(windows, 0.02, 0.02, seed=3)
    hole = series.mask(*windows[1].window)
    exposure = np.where(hole, 0.0, series.exposure)
    checks = check_events(Series(series.start, series.step, np.where(hole, 0, series.value), exposure), windows, windows)
    assert checks[0].verdict.startswith("no effect")
    assert checks[1].verdict == "not enough data: 0% of the window measured" and checks[1].ratio is None


def test_holidays_and_other_events_stay_out_of_the_baseline() -> None:
    windows = events(2)
    holiday = Event(id="h", title="holiday", category="holiday", start=date(2018, 6, 1), end=date(2018, 6, 30))
    series = synthetic(windows + [holiday], p_base=0.01, p_in=0.3, seed=4)  # the holiday is noisy too
    with_holiday = check_events(series, windows, windows + [holiday])
    without = check_events(series, windows, windows)
    for kept_out, mixed in zip(with_holiday, without, strict=True):
        assert kept_out.baseline_rate is not None and mixed.baseline_rate is not None
        assert kept_out.baseline_rate < mixed.baseline_rate


def test_outage_series_counts_only_measured_time() -> None:
    outages = pd.DataFrame({"start": [YEAR + pd.Timedelta(minutes=30)], "end": [YEAR + pd.Timedelta(hours=3)]})
    coverage = pd.DataFrame({"start": [YEAR, YEAR + pd.Timedelta(hours=2, minutes=30)],
                             "end": [YEAR + pd.Timedelta(hours=1), YEAR + pd.Timedelta(hours=3)]})  # fmt: skip
    series = outage_series(outages, coverage, YEAR, YEAR + pd.Timedelta(hours=4))
    assert series.exposure.tolist() == [60, 0, 30, 0]
    assert series.value.tolist() == [30, 0, 30, 0]  # hour 1 was not measured: unknown, not outage


def test_overlapping_outages_of_two_paths_count_once() -> None:
    outages = pd.DataFrame({"start": [YEAR, YEAR + pd.Timedelta(minutes=10)],
                            "end": [YEAR + pd.Timedelta(minutes=30), YEAR + pd.Timedelta(minutes=40)]})  # fmt: skip
    coverage = pd.DataFrame({"start": [YEAR], "end": [YEAR + pd.Timedelta(hours=1)]})
    assert outage_series(outages, coverage, YEAR, YEAR + pd.Timedelta(hours=1)).value.tolist() == [40]


def test_lead_and_lag_of_the_first_outage() -> None:
    windows = events(1)
    series = synthetic(windows, 0.02, 0.4, seed=5)
    start = windows[0].window[0]
    firsts = pd.Series([start - pd.Timedelta(hours=30), start + pd.Timedelta(hours=5)])
    (check,) = check_events(series, windows, windows, before=pd.Timedelta(days=1), first_outages=firsts)
    assert check.lead_lag_hours == pytest.approx(5)
    (check,) = check_events(series, windows, windows, before=pd.Timedelta(days=2), first_outages=firsts)
    assert check.lead_lag_hours == pytest.approx(-30)


def test_an_external_daily_series_with_a_drop() -> None:
    windows = events(5, days=10)
    days = pd.date_range("2018-01-01", periods=365, freq="D", tz="UTC")
    rng = np.random.default_rng(6)
    users = pd.Series(1000 + rng.normal(0, 50, len(days)), index=days)
    for event in windows:
        start, end = event.window
        midday = users.index + pd.Timedelta(hours=12)
        users[(midday >= start) & (midday < end)] *= 0.5
    series = external_series(users.to_frame("users"), "users")
    checks = check_events(series, windows, windows, two_sided=True)
    for check in checks:
        assert check.verdict.startswith("effect") and "drop" in check.verdict, check
    # 95 % intervals: most of them cover the true ratio, 0.5
    assert sum(c.ci_low is not None and c.ci_high is not None and c.ci_low <= 0.5 <= c.ci_high for c in checks) >= 4


def rolled_p(series: Series, window: np.ndarray, two_sided: bool) -> float | None:
    """The circular-shift p-value as first written: the whole series rolled for every day."""
    per_day, days = series.bins_per_unit, len(series.value) // series.bins_per_unit
    observed = series.value[window].sum() / series.exposure[window].sum()
    base = series.value.sum() / series.exposure.sum()
    extreme = total = 0
    for k in range(1, days):
        v = np.roll(series.value, k * per_day)[window].sum()
        e = np.roll(series.exposure, k * per_day)[window].sum()
        if e <= 0:
            continue
        total += 1
        if two_sided:
            extreme += abs(np.log((v / e + 1e-9) / (base + 1e-9))) >= abs(np.log((observed + 1e-9) / (base + 1e-9)))
        else:
            extreme += v / e >= observed
    return (1 + extreme) / (1 + total) if total else None


@pytest.mark.parametrize("two_sided", [False, True])
def test_circular_shifts_gather_only_the_window_and_give_the_rolled_answer(two_sided: bool) -> None:
    """The p-value gathers the window's bins for each shift instead of rolling the whole
    series (a long hourly series took minutes an event); the answer is the same, on a
    series with unmeasured hours, on ties and with a length that is no whole number of days."""
    windows = events(5, days=9)
    noisy = synthetic(windows, 0.02, 0.2, seed=8)
    gaps = np.random.default_rng(9).random(HOURS) < 0.1
    noisy = Series(YEAR, noisy.step, np.where(gaps, 0, noisy.value)[:-7], np.where(gaps, 0, noisy.exposure)[:-7])
    flat = Series(YEAR, noisy.step, np.full(HOURS, 12.5), np.full(HOURS, 60.0))  # every shift ties
    for series in (noisy, flat):
        checks = check_events(series, windows, windows, two_sided=two_sided)
        for event, check in zip(windows, checks, strict=True):
            window = series.mask(*event.window) & (series.exposure > 0)
            assert check.p_value == pytest.approx(rolled_p(series, window, two_sided), abs=1e-12), event.id
    assert all(c.p_value == 1 for c in check_events(flat, windows, windows, two_sided=two_sided))
