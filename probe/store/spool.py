"""The spool: a vantage point's SQLite store seen as the queue of what the fleet's central
store lacks, which the forwarder (probe/fleet/forwarder.py) uploads.

Its `forward_cursor` (one row) notes how far uploads got: the measurement id and heartbeat
rowid uploaded up to, the measurements given up over the backlog's bound, and the rollup
cursor of the summaries last uploaded. The rows after it are the backlog. Only this module
reads or writes that table: the forwarder through a `Spool`, `tunnelwatch status` by
`Spool.backlog`, and compaction, which must keep the backlog, by `Spool.uploaded`.
A cursor moves only after the central store has committed what it covers: a forwarder
killed in between sends those rows again, and the central store keeps them once.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from probe.errors import StoreError
from probe.store.schema import (
    HEARTBEAT_COLUMNS,
    MEASUREMENT_COLUMNS,
    PATH_COLUMNS,
    ROLLUP_CURSOR_COLUMNS,
    SUMMARY_TABLES,
)

SUMMARY_MARGIN_MS = 86_400_000  # compaction extends runs, hours and spans at most this far back
_UPLOADED = {
    "measurements": "id <= (SELECT coalesce(max(measurement_id), 0) FROM forward_cursor)",
    "heartbeats": "rowid <= (SELECT coalesce(max(heartbeat_rowid), 0) FROM forward_cursor)",
}
Row = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Backlog:
    measurements: int  # not uploaded yet
    oldest_ms: int | None  # when the oldest of them started
    dropped: int  # given up over the spool's bound, ever

    def age_s(self, now_ms: int | None = None) -> float:
        if self.oldest_ms is None:
            return 0.0
        return max(0.0, ((now_ms if now_ms is not None else time.time() * 1000) - self.oldest_ms) / 1000)


@dataclass(frozen=True, slots=True)
class Batch:
    """The next rows to upload, and where the cursor goes once they are stored."""

    measurements: list[Row]  # MEASUREMENT_COLUMNS
    heartbeats: list[Row]  # HEARTBEAT_COLUMNS
    paths: list[Row]  # PATH_COLUMNS, every path the spool knows
    measurement_id: int
    heartbeat_rowid: int


@dataclass(frozen=True, slots=True)
class Summaries:
    """The summary rows recent as of the last upload, once compaction has moved on since."""

    since_ms: int  # the rows of each table whose `recent` column is at least this
    tables: dict[str, list[Row]]  # by table name, in the SummaryTable's columns
    rollup_cursor: tuple[int, float]  # ROLLUP_CURSOR_COLUMNS


class Spool:
    """A spool's upload cursor and backlog, over a connection to its SQLite file. Blocking
    calls; one thread at a time."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    @classmethod
    def open(cls, path: Path) -> Spool:
        """The forwarder's own connection to the spool, with a cursor to move (from the
        start for a spool never uploaded)."""
        db = None
        try:
            db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("INSERT OR IGNORE INTO forward_cursor (id, measurement_id, heartbeat_rowid) VALUES (1, 0, 0)")
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            raise StoreError(f"{path}: cannot open the spool: {exc}") from None
        return cls(db)

    @staticmethod
    def uploaded(table: Literal["measurements", "heartbeats"]) -> str:
        """The SQL condition true of the rows of `table` the central store has (none in a
        spool never uploaded): in fleet mode, what compaction may delete."""
        return _UPLOADED[table]

    def backlog(self) -> Backlog:
        """What the spool holds that the central store does not have yet."""
        row = self._db.execute("SELECT measurement_id, dropped FROM forward_cursor").fetchone()
        after, dropped = row if row else (0, 0)
        count, oldest = self._db.execute(
            "SELECT count(*), min(started_at_ms) FROM measurements WHERE id > ?", [after]
        ).fetchone()
        return Backlog(count, oldest, dropped)

    def batch(self, size: int) -> Batch:
        """Up to `size` measurements and `size` heartbeats after the cursor, oldest first."""
        measurement_id, heartbeat_rowid = self._db.execute(
            "SELECT measurement_id, heartbeat_rowid FROM forward_cursor"
        ).fetchone()
        rows = self._db.execute(
            f"SELECT id, {', '.join(MEASUREMENT_COLUMNS)} FROM measurements WHERE id > ? ORDER BY id LIMIT ?",
            [measurement_id, size],
        ).fetchall()
        beats = self._db.execute(
            f"SELECT rowid, {', '.join(HEARTBEAT_COLUMNS)} FROM heartbeats WHERE rowid > ? ORDER BY rowid LIMIT ?",
            [heartbeat_rowid, size],
        ).fetchall()
        paths = self._db.execute(f"SELECT {', '.join(PATH_COLUMNS)} FROM paths ORDER BY name").fetchall()
        return Batch(
            [r[1:] for r in rows],
            [b[1:] for b in beats],
            paths,
            rows[-1][0] if rows else measurement_id,
            beats[-1][0] if beats else heartbeat_rowid,
        )

    def sent(self, batch: Batch) -> None:
        """The central store has committed `batch`: move the cursor past it."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE forward_cursor SET measurement_id = ?, heartbeat_rowid = ?",
                [batch.measurement_id, batch.heartbeat_rowid],
            )

    def give_up(self, bound: int) -> int:
        """Give up the oldest measurements of a backlog over `bound` (counted as dropped), so
        the spool cannot fill the disk; how many."""
        over = self.backlog().measurements - bound
        if over <= 0:
            return 0
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            (cut,) = self._db.execute(
                "SELECT id FROM measurements WHERE id > (SELECT measurement_id FROM forward_cursor) "
                "ORDER BY id LIMIT 1 OFFSET ?",
                [over - 1],
            ).fetchone()
            self._db.execute("UPDATE forward_cursor SET measurement_id = ?, dropped = dropped + ?", [cut, over])
        return over

    def summaries(self) -> Summaries | None:
        """The summaries compaction wrote, to upload; None when compaction has
        not moved on since the last upload."""
        cursor = self._db.execute(f"SELECT {', '.join(ROLLUP_CURSOR_COLUMNS)} FROM rollup_cursor").fetchone()
        (sent_until,) = self._db.execute("SELECT summaries_ms FROM forward_cursor").fetchone()
        if cursor is None or cursor[0] == sent_until:
            return None
        since = (sent_until or 0) - SUMMARY_MARGIN_MS
        tables = {
            table.name: self._db.execute(
                f"SELECT {', '.join(table.columns)} FROM {table.name} WHERE {table.recent} >= ?", [since]
            ).fetchall()
            for table in SUMMARY_TABLES
        }
        return Summaries(since, tables, cursor)

    def summaries_sent(self, summaries: Summaries) -> None:
        """The central store has committed `summaries`: note how far they went."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE forward_cursor SET summaries_ms = ?", [summaries.rollup_cursor[0]])

    def close(self) -> None:
        self._db.close()
