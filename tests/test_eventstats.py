"""The event statistics, calibrated: planted effects found at the stated power, ordinary
dates flagged at no more than the stated rate, on synthetic series with a trend, weekly and
yearly seasonality and missing runs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from analysis.eventstats import Calculator, Method, pool, q_values

DAYS = 10 * 365
EVENT_DAYS = 7
SEEDS = range(200)


def synthetic(seed: int, effect: float = 1.0, at: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """A positive daily series: a level rising 30 % a year, a weekly cycle of +-10 %, a
    yearly one of +-20 %, 20 % day-to-day noise and three missing runs of ten days. Events:
    four a year on fixed dates, as the calendar's are (Spring Festival, the two sessions,
    4 June, Golden Week); the one checked starts at `at` (by default a random ordinary date,
    a placebo date) and multiplies the series by `effect` for its seven days."""
    rng = np.random.default_rng(seed)
    days = np.arange(DAYS)
    log_level = (
        np.log(100)
        + 0.3 * days / 365
        + 0.1 * np.sin(2 * np.pi * days / 7)
        + 0.1 * np.sin(2 * np.pi * days / 365)
        + rng.normal(0, 0.2, DAYS)
    )
    excluded = np.zeros(DAYS, dtype=bool)
    for year in range(DAYS // 365):
        for day, length in ((31, 7), (62, 12), (155, 1), (274, 7)):
            excluded[year * 365 + day : year * 365 + day + length + 5] = True
    if at is None:  # an ordinary date: 30 days or more from the calendar's events
        near = np.convolve(excluded, np.ones(61), mode="same") > 0
        ordinary = [t for t in range(60, DAYS - 30) if not near[t : t + EVENT_DAYS].any()]
        at = int(rng.choice(ordinary))
    values = np.exp(log_level)
    values[at : at + EVENT_DAYS] *= effect
    for start in rng.integers(0, DAYS - 10, 3):
        values[start : start + 10] = np.nan
    excluded[at : at + EVENT_DAYS] = True
    return values, excluded, at


def p_value(seed: int, effect: float, method: Method = Method()) -> float | None:
    values, excluded, at = synthetic(seed, effect)
    return Calculator(values, excluded, method).effect(at, EVENT_DAYS).p_value


def test_a_planted_effect_of_1_5x_is_found_in_90_percent_of_seeds() -> None:
    ps = [p_value(seed, 1.5) for seed in SEEDS]
    evaluated = [p for p in ps if p is not None]
    assert len(evaluated) >= 0.9 * len(ps)  # a few land on a missing run: not evaluable, never "no effect"
    found = sum(p < 0.05 for p in evaluated)
    assert found >= 0.9 * len(evaluated), found


def _consistent_with_5_percent(ps: list[float]) -> None:
    """At most 5 % of p-values under 0.05, as far as a finite sample can tell: a count the
    binomial distribution at 5 % would exceed only once in a hundred samples fails."""
    flagged = sum(p < 0.05 for p in ps)
    assert flagged <= binom.ppf(0.99, len(ps), 0.05), f"{flagged} of {len(ps)} ordinary dates flagged"
    assert 0.4 < float(np.mean(ps)) < 0.6  # and the rest spread evenly, not piled at 1


def test_ordinary_dates_are_flagged_at_no_more_than_5_percent() -> None:
    ps = [p for seed in range(400) if (p := p_value(seed, 1.0)) is not None]
    assert len(ps) >= 380
    _consistent_with_5_percent(ps)


def test_with_weekly_seasonal_adjustment_too() -> None:
    ps = [p for seed in range(200) if (p := p_value(seed, 1.0, Method(seasonal=(7,)))) is not None]
    _consistent_with_5_percent(ps)


def test_the_interval_holds_the_planted_ratio() -> None:
    covered, total = 0, 0
    for seed in SEEDS[:100]:
        values, excluded, at = synthetic(seed, 1.5)
        result = Calculator(values, excluded, Method()).effect(at, EVENT_DAYS)
        if result.ci_low is None or result.ci_high is None:
            continue
        total += 1
        covered += result.ci_low <= 1.5 <= result.ci_high
    assert total >= 90 and covered >= 0.9 * total, (covered, total)


def test_an_earlier_spike_does_not_hide_the_next() -> None:
    """The baseline's inpainting: a 3x spike ten days before the baseline ends does not
    raise the baseline of the event after it."""
    values, excluded, at = synthetic(1, 1.5, at=500)
    spiked = values.copy()
    spiked[480:484] *= 3
    plain = Calculator(values, excluded, Method()).effect(at, EVENT_DAYS)
    after_spike = Calculator(spiked, excluded, Method()).effect(at, EVENT_DAYS)
    assert plain.ratio is not None and after_spike.ratio is not None
    assert after_spike.ratio == pytest.approx(plain.ratio, rel=0.05)


def test_missing_data_is_not_evaluable_with_the_reason() -> None:
    values, excluded, at = synthetic(2, 1.5, at=500)
    values[at : at + 5] = np.nan
    result = Calculator(values, excluded, Method()).effect(at, EVENT_DAYS)
    assert result.p_value is None and result.reason == "5 of 7 window units missing"
    values, excluded, at = synthetic(2, 1.5, at=500)
    values[at - 7 - 3 * 28 : at - 7] = np.nan
    result = Calculator(values, excluded, Method()).effect(at, EVENT_DAYS)
    assert result.reason == "28 of 28 baseline units missing or excluded"


def test_q_values_are_benjamini_hochberg() -> None:
    assert q_values([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])


def test_a_category_of_ten_events_without_effect_is_no_effect() -> None:
    rejected = 0
    for seed in range(50):
        rng = np.random.default_rng(seed)
        pooled = pool({f"e{i}": float(v) for i, v in enumerate(rng.normal(0, 1, 10))})
        assert pooled is not None and pooled.events == 10
        rejected += pooled.p_value < 0.05
    assert rejected <= 0.05 * 50


def test_a_category_with_an_effect_is_found_and_one_event_driving_it_shows() -> None:
    strong = pool({f"e{i}": 0.4 + 0.1 * np.sin(i) for i in range(10)})
    assert strong is not None and strong.p_value < 0.01 and strong.agree == 10
    driven = pool({"big": 5.0, **{f"e{i}": 0.05 * (-1) ** i for i in range(9)}})
    assert driven is not None
    assert driven.left_out["big"][1] > 0.5  # without it, nothing is left


@pytest.mark.parametrize("baseline", [2, 3, 5])
def test_a_short_baseline_for_a_short_run_works(baseline: int) -> None:
    values, excluded, at = synthetic(3, 2.0, at=500)
    result = Calculator(values, excluded, Method(baseline=baseline, gap=0, shifts=(0, 0), placebo_gap=2)).effect(at, 7)
    assert result.p_value is not None and result.ratio is not None and result.ratio > 1.5


def test_a_few_months_of_noise_is_never_an_effect() -> None:
    """100 days hold a few placebo dates, all close together: too few to calibrate a p-value,
    so the event is not evaluable, never an effect of noise. A placebo gap longer than the
    series leaves no placebo date at all."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        values = np.exp(rng.normal(np.log(100), 0.2, 100))
        excluded = np.zeros(100, dtype=bool)
        excluded[70:76] = True
        result = Calculator(values, excluded, Method()).effect(70, 6)
        assert result.p_value is None and result.reason is not None and "placebo dates" in result.reason
        assert len(Calculator(values, excluded, Method(placebo_gap=720)).placebos(6)) == 0
