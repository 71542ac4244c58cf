"""The spool's upload cursor (probe/store/spool.py) on a real SQLite store; the uploads
themselves are in tests/test_fleet.py."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from probe.model import Heartbeat, Measurement
from probe.store.schema import MEASUREMENT_COLUMNS, to_ms
from probe.store.spool import SUMMARY_MARGIN_MS, Spool
from probe.store.sqlite import open_store

START = datetime(2018, 3, 5, 8, 0, tzinfo=UTC)


def spool_with(path: Path, rounds: int) -> None:
    """`rounds` rounds of two measurements and a heartbeat, a minute apart."""
    store = open_store(path)
    store.record_paths([("direct", "direct", "", None)])
    for i in range(rounds):
        at = START + timedelta(minutes=i)
        store.write(
            [
                Measurement(
                    vantage="v",
                    round_id=f"r{i}",
                    target=target,
                    group="blocked",
                    path="direct",
                    kind="http",
                    input="https://news.example/",
                    started_at=at,
                    ok=True,
                )
                for target in ("news", "search")
            ],
            [Heartbeat(vantage="v", round_id=f"r{i}", started_at=at, finished_at=at, probes=2, succeeded=2)],
        )
    store.close()


def test_a_batch_moves_the_cursor_only_when_sent(tmp_path: Path) -> None:
    spool_with(tmp_path / "spool.db", rounds=3)
    spool = Spool.open(tmp_path / "spool.db")
    assert spool.backlog().measurements == 6 and spool.backlog().oldest_ms == to_ms(START)
    batch = spool.batch(4)
    assert (len(batch.measurements), len(batch.heartbeats), batch.paths) == (4, 3, [("direct", "direct", "", None)])
    assert [row[MEASUREMENT_COLUMNS.index("round_id")] for row in batch.measurements] == ["r0", "r0", "r1", "r1"]
    assert spool.backlog().measurements == 6  # read, not sent: a forwarder killed now sends it again
    assert spool.batch(4) == batch
    spool.sent(batch)
    backlog = spool.backlog()
    assert (backlog.measurements, backlog.oldest_ms, backlog.dropped) == (2, to_ms(START + timedelta(minutes=2)), 0)
    assert backlog.age_s(to_ms(START + timedelta(minutes=3))) == 60.0
    rest = spool.batch(4)
    assert (len(rest.measurements), len(rest.heartbeats)) == (2, 0)
    spool.close()


def test_a_backlog_over_its_bound_gives_up_its_oldest(tmp_path: Path) -> None:
    spool_with(tmp_path / "spool.db", rounds=5)
    spool = Spool.open(tmp_path / "spool.db")
    assert spool.give_up(10) == 0
    assert spool.give_up(4) == 6
    backlog = spool.backlog()
    assert (backlog.measurements, backlog.oldest_ms, backlog.dropped) == (4, to_ms(START + timedelta(minutes=3)), 6)
    assert spool.give_up(4) == 0 and spool.backlog().dropped == 6
    spool.close()


def test_compaction_may_delete_only_what_was_uploaded(tmp_path: Path) -> None:
    spool_with(tmp_path / "spool.db", rounds=3)
    db = sqlite3.connect(tmp_path / "spool.db")

    def uploaded() -> tuple[int, int]:
        return (
            db.execute(f"SELECT count(*) FROM measurements WHERE {Spool.uploaded('measurements')}").fetchone()[0],
            db.execute(f"SELECT count(*) FROM heartbeats WHERE {Spool.uploaded('heartbeats')}").fetchone()[0],
        )

    assert uploaded() == (0, 0)  # a spool never uploaded: no cursor yet
    spool = Spool.open(tmp_path / "spool.db")
    assert uploaded() == (0, 0)
    spool.sent(spool.batch(3))
    assert uploaded() == (3, 3)
    spool.close()
    db.close()


def test_summaries_go_up_once_compaction_moved_on(tmp_path: Path) -> None:
    spool_with(tmp_path / "spool.db", rounds=1)
    spool = Spool.open(tmp_path / "spool.db")
    assert spool.summaries() is None  # never compacted
    hour = to_ms(START)
    with sqlite3.connect(tmp_path / "spool.db") as db:
        db.execute("INSERT INTO rollup_cursor (id, until_ms, slot_s) VALUES (1, ?, 60)", [hour + 3_600_000])
        db.execute("INSERT INTO hourly VALUES (?, 'blocked', 'direct', 2, 0)", [hour])
    summaries = spool.summaries()
    assert summaries is not None
    assert (summaries.since_ms, summaries.rollup_cursor) == (-SUMMARY_MARGIN_MS, (hour + 3_600_000, 60.0))
    assert summaries.tables["hourly"] == [(hour, "blocked", "direct", 2, 0)]
    assert summaries.tables["verdict_runs"] == summaries.tables["coverage"] == []
    spool.summaries_sent(summaries)
    assert spool.summaries() is None
    with sqlite3.connect(tmp_path / "spool.db") as db:
        db.execute("UPDATE rollup_cursor SET until_ms = ?", [hour + 7_200_000])
    later = spool.summaries()
    assert later is not None and later.since_ms == hour + 3_600_000 - SUMMARY_MARGIN_MS
    spool.close()
