"""Outage intervals from stores with known injected outages: the exact intervals come back."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from analysis.frames import load_measurements, load_paths
from analysis.outages import Hysteresis, degraded, pair_outages, path_outages
from analysis.outages_cli import duration
from analysis.summary import RUN_KEY, hourly_latency, verdict_runs
from analysis.verdicts import classify
from tests.analysis_data import INTERVAL, T0, build_store, everything, fail

RESET = fail("connection_reset", "tls_handshake")
PROXY_DOWN = fail("connection_refused", "proxy_connect")


def at(index: int, target: str = "news") -> pd.Timestamp:
    offset = list(everything()).index(target)
    return pd.Timestamp(T0 + index * INTERVAL + timedelta(seconds=offset * 10))


def outages_for(
    tmp_path: Path,
    schedule: dict[int, dict[tuple[str, str], dict[str, Any]]],
    rounds: range,
    hysteresis: Hysteresis = Hysteresis(),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    db = tmp_path / "tw.db"
    build_store(db, [(i, everything(schedule.get(i, {}))) for i in rounds])
    verdicts = classify(load_measurements(db), load_paths(db))
    pairs = pair_outages(verdict_runs(verdicts), hysteresis)
    return pairs, path_outages(pairs)


def test_an_injected_block_gives_its_exact_interval(tmp_path: Path) -> None:
    pairs, paths = outages_for(tmp_path, {i: {("news", "direct"): RESET} for i in range(3, 8)}, range(13))
    (outage,) = pairs.to_dict("records")
    assert (outage["target"], outage["path"], outage["verdict"]) == ("news", "direct", "blocked")
    assert (outage["start"], outage["end"]) == (at(3), at(8))  # closed by the first good round
    assert outage["minutes"] == 25 and outage["rounds"] == 5 and not outage["ongoing"]
    assert outage["failed_share"] == 1.0  # a solid outage
    assert outage["rules"] == ("blocked-tls",)
    (by_path,) = paths.to_dict("records")
    assert (by_path["path"], by_path["targets"], by_path["start"], by_path["end"]) == (
        "direct",
        ("news",),
        at(3),
        at(8),
    )


def test_one_failing_round_is_not_an_outage(tmp_path: Path) -> None:
    pairs, _ = outages_for(tmp_path, {4: {("news", "direct"): RESET}, 9: {("news", "direct"): RESET}}, range(12))
    assert pairs.empty


def test_one_good_round_does_not_close_an_outage(tmp_path: Path) -> None:
    failing = [2, 3, 5, 6]  # round 4 is good, alone
    pairs, _ = outages_for(tmp_path, {i: {("news", "direct"): RESET} for i in failing}, range(10))
    (outage,) = pairs.to_dict("records")
    assert (outage["start"], outage["end"], outage["rounds"]) == (at(2), at(7), 4)


def test_hysteresis_is_configurable(tmp_path: Path) -> None:
    schedule = {4: {("news", "direct"): RESET}}
    pairs, _ = outages_for(tmp_path, schedule, range(8), Hysteresis(open_after=1, close_after=1))
    (outage,) = pairs.to_dict("records")
    assert (outage["start"], outage["end"]) == (at(4), at(5))


def test_a_stopped_daemon_is_unknown_not_an_outage(tmp_path: Path) -> None:
    rounds = [*range(0, 6), *range(30, 36)]  # the daemon was stopped for rounds 6-29
    schedule = {i: {("news", "direct"): RESET} for i in (4, 5, 30, 31)}
    db = tmp_path / "tw.db"
    build_store(db, [(i, everything(schedule.get(i, {}))) for i in rounds])
    pairs = pair_outages(verdict_runs(classify(load_measurements(db), load_paths(db))))
    first, second = pairs.sort_values("start").to_dict("records")
    assert (first["start"], first["end"]) == (at(4), at(6))  # one interval after its last failing round
    assert (second["start"], second["end"]) == (at(30), at(32))


def test_an_outage_still_on_at_the_end_is_ongoing(tmp_path: Path) -> None:
    pairs, _ = outages_for(tmp_path, {i: {("news", "direct"): RESET} for i in range(5, 10)}, range(10))
    (outage,) = pairs.to_dict("records")
    assert outage["ongoing"] and (outage["start"], outage["end"]) == (at(5), at(10))


def random_failures(share: float, rounds: int, seed: int) -> pd.DataFrame:
    """Verdict runs of one (target, path) whose rounds fail at random with `share`, one round
    per INTERVAL: what a share of connections dropped at random gives."""
    failing = np.random.default_rng(seed).random(rounds) < share
    verdicts = pd.DataFrame(
        {
            "target": "news",
            "path": "direct",
            "started_at": [pd.Timestamp(T0 + i * INTERVAL) for i in range(rounds)],
            "state": np.where(failing, "failing", "ok"),
            "verdict": np.where(failing, "blocked", "ok"),
            "rule": np.where(failing, "blocked-tls", "ok"),
            "blocking": np.where(failing, "tls", ""),
            "detail": "",
        }
    )
    return verdict_runs(verdicts[["target", "path", "started_at", *RUN_KEY]])


def test_half_the_rounds_failing_at_random_is_one_long_outage_not_flapping() -> None:
    # With p = 1/2 failing, a run of 8 good rounds in a row (what settles an outage) comes once
    # in 2^9 - 2 = 510 rounds on average: in 500 rounds about one, so one or two outages; a
    # split needs such a run, and 500 rounds hold at most 500 / 9 of them but on average
    # 500 / 2^9 ~ 1. Without the settle rule the same rounds are dozens of short outages.
    runs = random_failures(0.5, 500, seed=5)  # 264 failing rounds; seeds 0-59: 1 to 4 outages
    flapping = pair_outages(runs, Hysteresis(settle_after=1))
    assert len(flapping) > 20, len(flapping)
    pairs = pair_outages(runs)
    assert 1 <= len(pairs) <= 4, pairs[["start", "end", "rounds", "failed_share"]]
    longest = pairs.loc[pairs["minutes"].idxmax()]
    assert longest["minutes"] >= 300 * 5  # most of the 500 rounds of 5 minutes
    assert 0.3 <= longest["failed_share"] <= 0.7, longest  # its share of failing rounds: about half
    assert (pairs["verdict"] == "blocked").all()


def test_a_recovery_of_settle_after_good_rounds_splits(tmp_path: Path) -> None:
    settled = {i: {("news", "direct"): RESET} for i in (*range(3, 8), *range(16, 20))}  # 8 good: 8-15
    pairs, _ = outages_for(tmp_path, settled, range(40))
    assert [(o["start"], o["end"], o["failed_share"]) for o in pairs.to_dict("records")] == [
        (at(3), at(8), 1.0),
        (at(16), at(20), 1.0),
    ]


def test_a_shorter_recovery_is_the_same_outage_going_on(tmp_path: Path) -> None:
    unsettled = {i: {("news", "direct"): RESET} for i in (*range(3, 8), *range(15, 19))}  # 7 good: 8-14
    pairs, paths = outages_for(tmp_path, unsettled, range(40))
    (outage,) = pairs.to_dict("records")
    assert (outage["start"], outage["end"], outage["rounds"]) == (at(3), at(19), 9)
    assert outage["failed_share"] == round(9 / 16, 3) and not outage["ongoing"]
    (by_path,) = paths.to_dict("records")
    assert (by_path["start"], by_path["end"], by_path["failed_share"]) == (at(3), at(19), round(9 / 16, 3))


def test_a_lone_failing_round_between_merged_outages_is_counted(tmp_path: Path) -> None:
    # round 11 fails alone (no outage of its own) between two outages that settle into one:
    # it is one of the merged outage's failing rounds, and of its share
    lone = {i: {("news", "direct"): RESET} for i in (*range(3, 8), 11, *range(15, 19))}
    pairs, paths = outages_for(tmp_path, lone, range(40))
    (outage,) = pairs.to_dict("records")
    assert (outage["start"], outage["end"], outage["rounds"]) == (at(3), at(19), 10)
    assert outage["failed_share"] == round(10 / 16, 3)
    (by_path,) = paths.to_dict("records")
    assert by_path["failed_share"] == round(10 / 16, 3)


def test_a_gap_never_merges_outages(tmp_path: Path) -> None:
    # closed by two good rounds just before the daemon stopped, failing again when it started
    rounds = [*range(0, 10), *range(30, 45)]
    schedule = {i: {("news", "direct"): RESET} for i in (4, 5, 6, 7, 30, 31, 32)}
    db = tmp_path / "tw.db"
    build_store(db, [(i, everything(schedule.get(i, {}))) for i in rounds])
    pairs = pair_outages(verdict_runs(classify(load_measurements(db), load_paths(db))))
    assert [(o["start"], o["end"]) for o in pairs.to_dict("records")] == [(at(4), at(8)), (at(30), at(33))]


def test_a_tunnel_crackdown_is_one_path_outage_over_every_target(tmp_path: Path) -> None:
    targets = ("news", "search", "portal", "shop")
    schedule = {i: {(t, "vpn"): PROXY_DOWN for t in targets} for i in range(2, 6)}
    pairs, paths = outages_for(tmp_path, schedule, range(9))
    assert len(pairs) == 4 and set(pairs["verdict"]) == {"tunnel_down"}
    (outage,) = paths.to_dict("records")
    assert (outage["path"], outage["verdict"], outage["targets"]) == ("vpn", "tunnel_down", tuple(sorted(targets)))
    vpn = pd.Timedelta(milliseconds=1)  # the vpn probe starts a millisecond after the direct one
    assert (outage["start"], outage["end"]) == (at(2, "news") + vpn, at(6, "shop") + vpn)


def _latency_frame(slow_hours: int, factor: float) -> pd.DataFrame:
    times = pd.date_range(T0, periods=12 * 24 * 9, freq="5min", tz="UTC")
    connect = pd.Series(20.0, index=times)
    slow = (times >= times[-1] - pd.Timedelta(hours=slow_hours)) & (times < times[-1] - pd.Timedelta(hours=1))
    connect[slow] = 20.0 * factor
    return pd.DataFrame(
        {
            "started_at": times,
            "path": "direct",
            "group": "blocked",
            "ok": True,
            "connect_ms": connect.to_numpy(),
            "first_byte_ms": 50.0,
            "total_ms": 80.0,
        }
    )


def test_throttling_is_degraded_with_its_factor() -> None:
    frame = _latency_frame(slow_hours=4, factor=10)
    (outage,) = degraded(hourly_latency(frame), factor=3).to_dict("records")
    assert outage["verdict"] == "degraded" and outage["factor"] == pytest.approx(10)
    assert outage["minutes"] == 180


def test_no_degradation_below_the_factor() -> None:
    assert degraded(hourly_latency(_latency_frame(slow_hours=4, factor=2)), factor=3).empty


def test_a_large_factor_on_tiny_times_is_not_degradation() -> None:
    frame = _latency_frame(slow_hours=4, factor=10)
    frame[["connect_ms", "first_byte_ms", "total_ms"]] /= 10  # 2 ms to 20 ms: noise, not throttling
    assert degraded(hourly_latency(frame), factor=3).empty
    (outage,) = degraded(hourly_latency(frame), factor=3, min_increase_ms=10).to_dict("records")
    assert outage["rules"] == ("connect_ms>3x-7D-median",)


@pytest.mark.parametrize(("settle_after", "told"), [(8, 1), (1, 3)])
def test_alerts_say_a_flapping_outage_once_and_back_once_settled(tmp_path: Path, settle_after: int, told: int) -> None:
    """Alerts follow the settle rule: a tunnel failing two rounds in three is one alert, "back"
    only after settle_after good rounds in a row, with the end `outages` gives; with
    settle_after = 1 (no settling) each flap is an alert of its own."""
    from analysis.alerts import evaluate
    from analysis.frames import Source
    from analysis.pipeline import analyse
    from tests.test_alerts import config

    db = tmp_path / "tw.db"
    down = {("news", "vpn"): fail("connection_refused", "proxy_connect")}
    build_store(db, [(i, everything(down if i in (10, 11, 14, 15, 18, 19) else {})) for i in range(40)])
    cfg = config(tmp_path, db, f"min_duration_s = 0\n[analysis]\nsettle_after = {settle_after}\n")
    changes = []
    now = T0 + timedelta(seconds=30)
    while now <= T0 + 40 * INTERVAL:
        changes += [(now, c) for c in evaluate(cfg, now) if c.alert.target == "news" and c.alert.path == "vpn"]
        now += INTERVAL
    assert [c.kind for _, c in changes] == ["down", "back"] * told, changes
    if settle_after == 8:
        (when_back,) = [t for t, c in changes if c.kind == "back"]
        assert when_back >= T0 + 27 * INTERVAL  # rounds 20-27 good: settled
        (outage,) = (
            analyse(Source(db), hysteresis=Hysteresis(settle_after=8))
            .pairs.query("target == 'news' and path == 'vpn'")
            .to_dict("records")
        )
        edges = (outage["start"].floor("s"), outage["end"].floor("s"))
        assert edges == (at(10, "news"), at(20, "news")) and outage["failed_share"] == 0.6
        assert changes[-1][1].alert.end_ms == int(outage["end"].timestamp() * 1000)


def test_an_outage_duration_is_given_to_the_second() -> None:
    # the lab's outages at 2 s rounds last seconds: 0.5 minutes was printed 00:00:00
    assert [duration(m) for m in (0.5, 1.2, 16 * 60 + 10, 5 * 24 * 60 + 180)] == [
        "00:00:30",
        "00:01:12",
        "16:10:00",
        "5 days 03:00:00",
    ]
