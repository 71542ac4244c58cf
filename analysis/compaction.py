"""Compaction: the only analysis code that writes the store. It summarises the finished
hours after the store's cursor (summary.py, from the raw rows frames.py reads), writes the
summaries and moves the cursor in one transaction, then deletes the raw rows the summaries
cover once they are older than `store.keep_raw_days`.

`tunnelwatch store compact` runs it; the daemon starts that command every
`daemon.compact_every_s`. Two compactions may run at once, and while the daemon writes: a
summary is written only if the cursor is still where its compaction read it.
"""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from probe.store.file import store_error
from probe.store.schema import COVERAGE, HOURLY, HOURLY_LATENCY, LATENCY_VALUES, VERDICT_RUNS, SummaryTable, to_ms
from probe.store.spool import Spool
from probe.store.sqlite import writable

from .frames import first_raw_hour, frame_columns, read_cursor, summarise_raw, utc_times
from .summary import (
    COVERAGE_COLUMNS,
    HOUR,
    HOURLY_COLUMNS,
    LATENCY_COLUMNS,
    RUN_COLUMNS,
    Summary,
    merge_coverage,
    merge_runs,
)

COMPACT_MARGIN = pd.Timedelta(hours=1)  # rows may be written this late (the writer buffers)
DAY_MS = 86_400_000


def compact(
    db: Path, slot_s: float, keep_raw_days: float, now: datetime | None = None, keep_unforwarded: bool = False
) -> tuple[int, int]:
    """Summarise the complete hours after the store's cursor, a day at a time, and delete raw
    rows older than `keep_raw_days` that are summarised. Returns (hours summarised, raw
    rows deleted). Safe to run while the daemon writes, and twice at once."""
    now_ts = pd.Timestamp(now or datetime.now(UTC))
    limit = (now_ts - COMPACT_MARGIN - pd.Timedelta(seconds=2 * slot_s)).floor(HOUR)
    hours = 0
    while True:
        cursor = read_cursor(db)
        start = first_raw_hour(db, cursor)
        if start is None or start >= limit:
            break
        end = min(limit, start.floor("1D") + pd.Timedelta(days=1))
        if not write_summary(db, summarise_raw(db, start, end, slot_s), cursor, end, slot_s):
            break  # another compactor moved the cursor first
        hours += int((end - start) / HOUR)
    cursor = read_cursor(db)
    deleted = 0
    if cursor is not None:
        deleted = delete_raw(
            db, min(cursor - COMPACT_MARGIN, now_ts - pd.Timedelta(days=keep_raw_days)), keep_unforwarded
        )
    return hours, deleted


def write_summary(db: Path, summary: Summary, expected: pd.Timestamp | None, end: pd.Timestamp, slot_s: float) -> bool:
    """Add a summary of the rounds before `end` and move the cursor to `end`, in one
    transaction, if the cursor is still `expected`. Runs and coverage continue the stored ones."""
    conn = writable(db)
    try:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT until_ms FROM rollup_cursor").fetchone()
        if (row[0] if row else None) != (None if expected is None else to_ms(expected.to_pydatetime())):
            conn.execute("ROLLBACK")
            return False
        _write_runs(conn, summary.runs)
        conn.executemany(
            _insert(HOURLY, "probes = probes + excluded.probes, failing = failing + excluded.failing"),
            [
                (to_ms(h), g, p, int(n), int(f))
                for h, g, p, n, f in summary.hourly[HOURLY_COLUMNS].itertuples(index=False)
            ],
        )
        conn.executemany(
            _insert(
                HOURLY_LATENCY,
                "samples = samples + excluded.samples, "  # each percentile: the mean weighted by samples
                + ", ".join(
                    f"{v} = (coalesce({v}, excluded.{v}) * samples + coalesce(excluded.{v}, {v}) * excluded.samples) "
                    "/ (samples + excluded.samples)"
                    for v in LATENCY_VALUES
                ),
            ),
            [
                (to_ms(r[0]), r[1], int(r[2]), *(None if pd.isna(x) else float(x) for x in r[3:]))
                for r in summary.latency[LATENCY_COLUMNS].itertuples(index=False)
            ],
        )
        _write_coverage(conn, summary.coverage, slot_s)
        conn.execute(
            "INSERT INTO rollup_cursor (id, until_ms, slot_s) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE "
            "SET until_ms = excluded.until_ms, slot_s = excluded.slot_s",
            [to_ms(end), slot_s],
        )
        conn.execute("COMMIT")
        return True
    except sqlite3.Error as exc:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # a damaged store may refuse that too
                conn.execute("ROLLBACK")
        raise store_error(db, exc, "write summaries") from None
    finally:
        conn.close()


def _write_runs(conn: sqlite3.Connection, runs: pd.DataFrame) -> None:
    if runs.empty:
        return
    since = to_ms(runs["first"].min()) - DAY_MS
    rows = conn.execute(
        f"SELECT id, {', '.join(frame_columns(VERDICT_RUNS))} FROM verdict_runs WHERE last_ms >= ?", [since]
    ).fetchall()
    old = pd.DataFrame.from_records(rows, columns=["id", *RUN_COLUMNS])
    if len(old):
        old = old.sort_values("last").groupby(["target", "path"]).tail(1)
        old["first"], old["last"] = utc_times(old["first"]), utc_times(old["last"])
    merged = merge_runs(old, runs.assign(id=None))
    grown = merged[merged["id"].notna()]
    conn.executemany(
        "UPDATE verdict_runs SET last_ms = ?, rounds = ? WHERE id = ?",
        [(to_ms(t), int(n), int(i)) for t, n, i in zip(grown["last"], grown["rounds"], grown["id"], strict=True)],
    )
    new = merged[merged["id"].isna()]
    conn.executemany(
        _insert(VERDICT_RUNS),
        [(*r[:-3], to_ms(r[-3]), to_ms(r[-2]), int(r[-1])) for r in new[RUN_COLUMNS].itertuples(index=False)],
    )


def _write_coverage(conn: sqlite3.Connection, coverage: pd.DataFrame, slot_s: float) -> None:
    if coverage.empty:
        return
    reach = to_ms(coverage["start"].min()) - round(slot_s * 1000 * 3)
    rows = conn.execute("SELECT start_ms, end_ms FROM coverage WHERE end_ms >= ?", [reach]).fetchall()
    old = pd.DataFrame(
        {
            "start": utc_times(pd.Series([r[0] for r in rows], dtype="int64")),
            "end": utc_times(pd.Series([r[1] for r in rows], dtype="int64")),
        }
    )
    # Spans that pause less than the gap allowance are one span.
    allowance = pd.Timedelta(seconds=1.5 * slot_s)
    widened = pd.DataFrame({"start": old["start"], "end": old["end"] + allowance})
    merged = merge_coverage(widened, coverage.assign(end=coverage["end"] + allowance))
    merged["end"] -= allowance
    conn.execute("DELETE FROM coverage WHERE end_ms >= ?", [reach])
    conn.executemany(
        _insert(COVERAGE),
        [(to_ms(a), to_ms(b)) for a, b in merged[COVERAGE_COLUMNS].itertuples(index=False)],
    )


def _insert(table: SummaryTable, on_conflict: str | None = None) -> str:
    """INSERT of a summary table's rows in the order of the Summary's frame of it; a row that
    is there (the key) updated by `on_conflict`."""
    columns = frame_columns(table)
    update = f" ON CONFLICT DO UPDATE SET {on_conflict}" if on_conflict else ""
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}){update}"


def delete_raw(db: Path, before: pd.Timestamp, keep_unforwarded: bool = False) -> int:
    """Delete raw rows that started before `before`, a day per transaction so the daemon's
    writer is never kept waiting long. In fleet mode (`keep_unforwarded`) rows the forwarder
    has not uploaded yet stay (probe/store/spool.py)."""
    measurements, heartbeats = "", ""
    if keep_unforwarded:
        measurements = f" AND {Spool.uploaded('measurements')}"
        heartbeats = f" AND {Spool.uploaded('heartbeats')}"
    conn = writable(db)
    deleted = 0
    try:
        oldest = conn.execute("SELECT MIN(started_at_ms) FROM measurements").fetchone()[0]
        limit = to_ms(before.to_pydatetime())
        cut = oldest
        while cut is not None and cut < limit:
            cut = min(limit, cut + DAY_MS)
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                deleted += conn.execute(
                    f"DELETE FROM measurements WHERE started_at_ms < ?{measurements}", [cut]
                ).rowcount
                conn.execute(f"DELETE FROM heartbeats WHERE started_at_ms < ?{heartbeats}", [cut])
    except sqlite3.Error as exc:
        raise store_error(db, exc, "delete old raw rows") from None
    finally:
        conn.close()
    return deleted
