"""Event statistics on synthetic series where the answer is known."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest

from analysis.eventcheck import Series, check_events, external_series, outage_series
from analysis.events import Event, overlapping
from analysis.eventstats import Method

YEAR = pd.Timestamp("2018-01-01", tz="UTC")
HOURS = 365 * 24


def events(count: int, days: int = 7, first: date = date(2018, 2, 1), every: int = 50) -> list[Event]:
    return [
        Event(id=f"e{i}", title=f"event {i}", category="policy", start=first + timedelta(days=every * i),
              end=first + timedelta(days=every * i + days - 1))
        for i in range(count)
    ]  # fmt: skip


def synthetic(windows: list[Event], p_base: float, p_in: float, seed: int, hours: int = 3 * HOURS) -> Series:
    """Hourly: each measured hour has an outage of 30 minutes with probability p (p_in inside
    the event windows), so the true rate ratio is p_in / p_base."""
    rng = np.random.default_rng(seed)
    series = Series(
        start=YEAR, step=pd.Timedelta(hours=1), value=np.zeros(hours), exposure=np.full(hours, 60.0), full=60.0
    )
    inside = np.zeros(hours, dtype=bool)
    for event in windows:
        inside |= series.mask(*event.window)
    p = np.where(inside, p_in, p_base)
    value = np.where(rng.random(hours) < p, 30.0, 0.0)
    return replace(series, value=value)


def yearly(count: int = 3, days: int = 7) -> list[Event]:
    """An event a year, on 1 July."""
    return [
        Event(
            id=f"e{i}", title=f"event {i}", category="policy", start=date(2018 + i, 7, 1), end=date(2018 + i, 7, days)
        )
        for i in range(count)
    ]


def test_a_planted_effect_is_found_with_its_onset() -> None:
    windows = yearly()
    checks = check_events(synthetic(windows, p_base=0.02, p_in=0.4, seed=1), windows, windows)
    for check in checks:
        assert check.verdict.startswith("effect: ") and "(more outages)" in check.verdict, check
        assert check.q_value is not None and check.q_value < 0.05
        assert check.onset_shift_units in (-1, 0)  # Beijing's 1 July starts at 16:00 UTC the day before
        assert check.inside_rate == pytest.approx(0.2, abs=0.05)  # 40 % of hours have 30 minutes out
        assert check.ratio is not None and check.ratio > 5


def test_minutes_as_units_give_the_answers_days_give() -> None:
    """A lab run of minutes: the same series, with a day shrunk to a minute, checked with
    minutes as the unit, gives the same ratios, intervals and p-values."""
    windows = yearly()
    daily = synthetic(windows, p_base=0.02, p_in=0.4, seed=1)
    shrink = 1440

    def small(t: pd.Timestamp) -> pd.Timestamp:
        return YEAR + (t - YEAR) / shrink

    minute = pd.Timedelta(minutes=1)
    series = Series(
        start=YEAR,
        step=daily.step / shrink,
        value=daily.value / shrink,
        exposure=daily.exposure / shrink,
        unit=minute,
        full=daily.full / shrink,
    )
    scaled = [
        Event(
            id=e.id,
            title=e.title,
            category=e.category,
            start=small(e.window[0]).to_pydatetime(),
            end=small(e.window[1]).to_pydatetime(),
        )
        for e in windows
    ]
    for day, fast in zip(check_events(daily, windows, windows), check_events(series, scaled, scaled), strict=True):
        assert fast.verdict.replace("units of 00:01:00", "days") == day.verdict
        assert (fast.ratio, fast.ci_low, fast.ci_high, fast.p_value) == pytest.approx(
            (day.ratio, day.ci_low, day.ci_high, day.p_value)
        )
    measured = np.arange(960) >= 600  # 40 minutes, the first 25 not measured
    short = Series(
        start=YEAR,
        step=series.step,
        value=np.where(measured, series.value[:960], 0),
        exposure=np.where(measured, series.exposure[:960], 0),
        unit=minute,
        full=series.full,
    )
    (check,) = check_events(short, scaled[:1], scaled)
    assert check.verdict.startswith("not evaluable: ")


def test_pure_noise_gives_no_effect() -> None:
    windows = yearly()
    for seed in range(3):
        checks = check_events(synthetic(windows, p_base=0.1, p_in=0.1, seed=seed), windows, windows)
        assert all(c.verdict.startswith("no effect: ") for c in checks), [c.verdict for c in checks]


def test_a_window_without_measurements_is_not_evaluable() -> None:
    windows = yearly()
    series = synthetic(windows, 0.02, 0.02, seed=3)
    hole = series.mask(*windows[1].window)
    checks = check_events(
        replace(series, value=np.where(hole, 0, series.value), exposure=np.where(hole, 0.0, series.exposure)),
        windows,
        windows,
    )
    assert checks[0].verdict.startswith("no effect")
    assert checks[1].verdict == "not evaluable: 7 of 7 window days missing" and checks[1].ratio is None


def test_holidays_and_other_events_stay_out_of_the_baseline() -> None:
    windows = yearly()
    holidays = [
        Event(id=f"h{i}", title="holiday", category="holiday", start=date(2018 + i, 5, 20), end=date(2018 + i, 6, 20))
        for i in range(3)
    ]
    series = synthetic(windows + holidays, p_base=0.01, p_in=0.3, seed=4)  # the holidays are noisy too
    kept_out = check_events(series, windows, windows + holidays)
    mixed = check_events(series, windows, windows)
    for with_holiday, without in zip(kept_out, mixed, strict=True):
        assert with_holiday.baseline_rate is not None and without.baseline_rate is not None
        assert with_holiday.baseline_rate < without.baseline_rate


def test_per_unit_means_leave_half_measured_units_out() -> None:
    series = Series(
        start=YEAR,
        step=pd.Timedelta(hours=1),
        value=np.array([30.0] * 24 + [60.0] * 11 + [0] * 13),
        exposure=np.array([60.0] * 24 + [60.0] * 11 + [0] * 13),
        full=60.0,
    )
    means, share = series.per_unit()
    assert means[0] == pytest.approx(0.5) and np.isnan(means[1])  # 11 of 24 hours measured: missing
    assert share.tolist() == pytest.approx([1.0, 11 / 24])


def test_outage_series_counts_only_measured_time() -> None:
    outages = pd.DataFrame({"start": [YEAR + pd.Timedelta(minutes=30)], "end": [YEAR + pd.Timedelta(hours=3)]})
    coverage = pd.DataFrame(
        {
            "start": [YEAR, YEAR + pd.Timedelta(hours=2, minutes=30)],
            "end": [YEAR + pd.Timedelta(hours=1), YEAR + pd.Timedelta(hours=3)],
        }
    )
    series = outage_series(outages, coverage, YEAR, YEAR + pd.Timedelta(hours=4))
    assert series.exposure.tolist() == [60, 0, 30, 0]
    assert series.value.tolist() == [30, 0, 30, 0]  # hour 1 was not measured: unknown, not outage


def test_overlapping_outages_of_two_paths_count_once() -> None:
    outages = pd.DataFrame(
        {
            "start": [YEAR, YEAR + pd.Timedelta(minutes=10)],
            "end": [YEAR + pd.Timedelta(minutes=30), YEAR + pd.Timedelta(minutes=40)],
        }
    )
    coverage = pd.DataFrame({"start": [YEAR], "end": [YEAR + pd.Timedelta(hours=1)]})
    assert outage_series(outages, coverage, YEAR, YEAR + pd.Timedelta(hours=1)).value.tolist() == [40]


def test_an_outage_overlaps_the_events_it_shares_time_with() -> None:
    first, second = events(2, days=1)  # one Beijing day each, 50 days apart
    start, end = first.window
    assert overlapping(start, end, [first, second]) == ("e0",)
    assert overlapping(start - pd.Timedelta(hours=1), start, [first]) == ()  # ends as the event starts
    assert overlapping(end - pd.Timedelta(1), second.window[0] + pd.Timedelta(1), [second, first]) == ("e1", "e0")


def test_lead_and_lag_of_the_first_outage() -> None:
    windows = yearly(1)
    series = synthetic(windows, 0.02, 0.4, seed=5)
    start = windows[0].window[0]
    firsts = pd.Series([start - pd.Timedelta(hours=30), start + pd.Timedelta(hours=5)])
    (check,) = check_events(series, windows, windows, before=pd.Timedelta(days=1), first_outages=firsts)
    assert check.lead_lag_hours == pytest.approx(5)
    (check,) = check_events(series, windows, windows, before=pd.Timedelta(days=2), first_outages=firsts)
    assert check.lead_lag_hours == pytest.approx(-30)


def test_an_external_daily_series_with_a_drop() -> None:
    windows = yearly(4, days=10)
    days = pd.date_range("2018-01-01", periods=4 * 365, freq="D", tz="UTC")
    rng = np.random.default_rng(6)
    users = pd.Series(1000 * np.exp(rng.normal(0, 0.05, len(days))), index=days)
    for event in windows:
        start, end = event.window
        midday = users.index + pd.Timedelta(hours=12)
        users[(midday >= start) & (midday < end)] *= 0.5
    series = external_series(users.to_frame("users"), "users")
    checks = check_events(series, windows, windows, method=Method(two_sided=True))
    for check in checks:
        assert check.verdict.startswith("effect: ") and "(drop)" in check.verdict, check
        assert check.ratio == pytest.approx(0.5, abs=0.05)
        assert check.ci_low is not None and check.ci_high is not None and check.ci_low < check.ratio < check.ci_high
    assert sum(c.ci_low is not None and c.ci_high is not None and c.ci_low <= 0.5 <= c.ci_high for c in checks) >= 3


@pytest.mark.parametrize(("effect", "verdict"), [(1.0, "no effect: "), (1.3, "effect: ")])
def test_a_category_of_ten_events_as_a_whole(effect: float, verdict: str) -> None:
    """Ten yearly events of one category on a noisy daily series: without an effect the
    category is no effect; with a 1.3x one at each, which at 20 % noise only some events show
    alone, the category shows it, and most of its events lean the same way."""
    windows = yearly(10, days=7)
    days = pd.date_range("2018-01-01", periods=10 * 365 + 2, freq="D", tz="UTC")
    rng = np.random.default_rng(11)
    users = pd.Series(1000 * np.exp(0.05 * np.arange(len(days)) / 365 + rng.normal(0, 0.2, len(days))), index=days)
    for event in windows:
        start, end = event.window
        midday = users.index + pd.Timedelta(hours=12)
        users[(midday >= start) & (midday < end)] *= effect
    series = external_series(users.to_frame("users"), "users")
    checks = check_events(series, windows, windows, method=Method(two_sided=True), pooled=True)
    (category,) = [c for c in checks if c.event == "category:policy"]
    assert category.pooled == 10 and category.verdict.startswith(verdict), category
    assert category.left_out is not None and set(category.left_out) == {e.id for e in windows}
    if effect > 1:
        assert category.ratio is not None and category.ci_low is not None and category.ci_low > 1
        assert category.agree is not None and category.agree >= 8


def test_units_are_whole_utc_days_wherever_the_data_starts() -> None:
    """A store whose first hour is 13:00: its days still run from 00:00 UTC, so an event day's
    outage lands in the event's own unit, not half in the unit before."""
    start = YEAR + pd.Timedelta(hours=13)
    hours = 60 * 24
    value = np.zeros(hours)
    day = 40  # 2018-02-10 (UTC), the outage the whole day
    first = int((YEAR + pd.Timedelta(days=day) - start) / pd.Timedelta(hours=1))
    value[first : first + 24] = 60.0
    series = Series(start=start, step=pd.Timedelta(hours=1), value=value, exposure=np.full(hours, 60.0), full=60.0)
    means, share = series.per_unit()
    assert series.unit_start == YEAR and share[0] == pytest.approx(11 / 24) and np.isnan(means[0])
    assert means[day] == 1.0 and means[day - 1] == 0.0 and means[day + 1] == 0.0
