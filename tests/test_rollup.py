"""Summaries and compaction: a compacted store, with its old raw rows deleted, gives the same
answers as the raw rows did."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from analysis.compaction import compact
from analysis.frames import frame_columns
from analysis.pipeline import Analysis, analyse
from analysis.summary import RUN_COLUMNS, Summary, clip_runs, merge_runs
from probe.store.schema import COVERAGE, HOURLY, HOURLY_LATENCY, VERDICT_RUNS
from tests.analysis_data import realistic_week

WEEK_END = pd.Timestamp("2018-03-11 16:00", tz="UTC")  # Monday 00:00 in Beijing, a week after the start


@pytest.fixture(scope="module")
def raw_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("rollup") / "raw.db"
    realistic_week(db)
    return db


def _copy(raw_store: Path, tmp_path: Path) -> Path:
    db = tmp_path / "tw.db"
    shutil.copy(raw_store, db)
    return db


def _same(a: Analysis, b: Analysis) -> None:
    pd.testing.assert_frame_equal(a.pairs, b.pairs)
    pd.testing.assert_frame_equal(a.paths, b.paths, check_exact=False, rtol=0.05)  # degraded factors: see latency

    def ordered(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.sort_values(list(frame.columns[:3])).reset_index(drop=True)

    pd.testing.assert_frame_equal(ordered(a.summary.hourly), ordered(b.summary.hourly), check_dtype=False)
    pd.testing.assert_frame_equal(a.summary.coverage, b.summary.coverage)
    assert a.span == b.span


def count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_compacting_hour_by_hour_changes_no_answer(raw_store: Path, tmp_path: Path) -> None:
    db = _copy(raw_store, tmp_path)
    before = analyse(db)
    assert len(before.pairs) >= 5  # the week has outages to compare
    for hours in range(0, 24 * 8, 5):  # as a daemon would, at uneven times
        compact(db, 300, keep_raw_days=365, now=(WEEK_END - pd.Timedelta(days=7, hours=-hours)).to_pydatetime())
    assert count(db, "measurements") == count(raw_store, "measurements")  # nothing deleted yet
    _same(before, analyse(db))


def test_raw_rows_go_after_keep_raw_days_and_the_answers_stay(raw_store: Path, tmp_path: Path) -> None:
    db = _copy(raw_store, tmp_path)
    before = analyse(db)
    week = analyse(db, WEEK_END - pd.Timedelta(days=3), WEEK_END - pd.Timedelta(days=1))
    now = WEEK_END + pd.Timedelta(days=1)
    hours, deleted = compact(db, 300, keep_raw_days=4, now=now.to_pydatetime())
    assert hours >= 7 * 24 and deleted > 0
    with sqlite3.connect(db) as conn:
        oldest = conn.execute("SELECT MIN(started_at_ms) FROM measurements").fetchone()[0]
    assert pd.Timestamp(oldest, unit="ms", tz="UTC") >= now - pd.Timedelta(days=4)  # kept: the last 4 days only
    _same(before, analyse(db))
    _same(week, analyse(db, WEEK_END - pd.Timedelta(days=3), WEEK_END - pd.Timedelta(days=1)))
    assert count(db, "verdict_runs") < count(raw_store, "measurements") / 20


def test_two_compactors_at_once_summarise_each_round_once(raw_store: Path, tmp_path: Path) -> None:
    db = _copy(raw_store, tmp_path)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            compact(db, 300, keep_raw_days=365, now=(WEEK_END + pd.Timedelta(days=1)).to_pydatetime())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with sqlite3.connect(db) as conn:
        summarised = conn.execute("SELECT SUM(probes) FROM hourly").fetchone()[0]
        raw = conn.execute("SELECT COUNT(*) FROM measurements WHERE grp != 'endpoint'").fetchone()[0]
    assert summarised == raw


def test_rows_written_after_the_cursor_still_count(raw_store: Path, tmp_path: Path) -> None:
    """The newest rows are read raw: what the daemon wrote since the last compaction shows."""
    db = _copy(raw_store, tmp_path)
    compact(db, 300, keep_raw_days=365, now=(WEEK_END - pd.Timedelta(days=2)).to_pydatetime())
    with sqlite3.connect(db) as conn:
        cursor = conn.execute("SELECT until_ms FROM rollup_cursor").fetchone()[0]
    assert pd.Timestamp(cursor, unit="ms", tz="UTC") < WEEK_END - pd.Timedelta(days=2)
    _same(analyse(raw_store), analyse(db))


def test_clip_runs_keeps_the_rounds_inside() -> None:
    t0 = pd.Timestamp("2018-03-05", tz="UTC")
    runs = Summary.empty().runs
    runs = pd.DataFrame(
        {**{c: [""] for c in runs.columns}, "first": [t0], "last": [t0 + pd.Timedelta(minutes=45)], "rounds": [10]}
    )
    (clipped,) = clip_runs(runs, t0 + pd.Timedelta(minutes=12), t0 + pd.Timedelta(minutes=30)).to_dict("records")
    assert clipped["first"] == t0 + pd.Timedelta(minutes=15)
    assert clipped["last"] == t0 + pd.Timedelta(minutes=25)
    assert clipped["rounds"] == 3
    assert clip_runs(runs, t0 + pd.Timedelta(hours=1), t0 + pd.Timedelta(hours=2)).empty


def test_a_range_open_at_its_start_keeps_what_is_before_its_end(raw_store: Path) -> None:
    """`outages --until` without --since: the runs before the end, as from a start before the
    data (Timestamp.min less a run's first round overflowed int64: no run was left)."""
    t0 = pd.Timestamp("2018-03-05", tz="UTC")
    runs = pd.DataFrame(
        {**{c: [""] for c in RUN_COLUMNS}, "first": [t0], "last": [t0 + pd.Timedelta(minutes=45)], "rounds": [10]}
    )
    (clipped,) = clip_runs(runs, pd.Timestamp.min.tz_localize("UTC"), t0 + pd.Timedelta(minutes=30)).to_dict("records")
    assert (clipped["first"], clipped["last"], clipped["rounds"]) == (t0, t0 + pd.Timedelta(minutes=25), 6)
    until = (WEEK_END - pd.Timedelta(days=2)).to_pydatetime()
    open_start = analyse(raw_store, None, until)
    assert len(open_start.pairs) >= 3
    pd.testing.assert_frame_equal(open_start.pairs, analyse(raw_store, datetime(2017, 1, 1, tzinfo=UTC), until).pairs)


def test_runs_go_on_across_the_cursor_whatever_their_step() -> None:
    """merge_runs: a pair's last run before the cursor goes on into its first after it when
    their verdicts match and the pause is one step, a pair probed hourly as well as one every 5
    minutes (old runs that end too early to go on are passed over before sorting: the bound
    takes the longest step); a pair whose last run ended a day before starts a new run."""
    cursor = pd.Timestamp("2018-03-05 12:00", tz="UTC")
    minutes = pd.Timedelta(minutes=1)

    def runs(*rows: tuple[str, str, pd.Timedelta, pd.Timedelta, int]) -> pd.DataFrame:
        return pd.DataFrame(
            [
                (
                    target,
                    "direct",
                    "ok" if verdict == "ok" else "failing",
                    verdict,
                    "r",
                    "",
                    "",
                    cursor + a,
                    cursor + b,
                    n,
                )
                for target, verdict, a, b, n in rows
            ],
            columns=RUN_COLUMNS,
        )

    old = runs(
        ("every5", "blocked", -600 * minutes, -125 * minutes, 96),
        ("every5", "ok", -120 * minutes, -5 * minutes, 24),
        ("hourly", "ok", -600 * minutes, -60 * minutes, 10),
        ("stopped", "ok", -2880 * minutes, -1440 * minutes, 289),
    )
    new = runs(
        ("every5", "ok", 0 * minutes, 60 * minutes, 13),
        ("hourly", "ok", 0 * minutes, 120 * minutes, 3),
        ("stopped", "ok", 0 * minutes, 60 * minutes, 13),
    )
    joined = merge_runs(old, new)
    assert joined[["target", "verdict", "rounds"]].values.tolist() == [
        ["every5", "blocked", 96],
        ["every5", "ok", 37],
        ["hourly", "ok", 13],
        ["stopped", "ok", 289],
        ["stopped", "ok", 13],
    ]
    assert joined["last"].tolist()[1:3] == [cursor + 60 * minutes, cursor + 120 * minutes]


def test_each_summary_frame_holds_its_tables_columns_in_order() -> None:
    """frames.py reads and compaction.py writes a summary table by the order of its frame's
    columns: the stored `x_ms` is the frame's time `x`, `grp` its `group`."""
    empty = Summary.empty()
    frames = (
        (VERDICT_RUNS, empty.runs),
        (HOURLY, empty.hourly),
        (HOURLY_LATENCY, empty.latency),
        (COVERAGE, empty.coverage),
    )
    for table, frame in frames:
        assert [{"grp": "group"}.get(c, c.removesuffix("_ms")) for c in frame_columns(table)] == list(frame.columns)
