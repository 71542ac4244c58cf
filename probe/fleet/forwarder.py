"""Store and forward: a vantage point's measurements go to its local SQLite store first (the
spool) and from there, in batches, to the fleet's central PostgreSQL (probe/store/central.py).

The spool's `forward_cursor` notes how far uploads got. A batch is read after the cursor,
stored centrally in one transaction (rows already there are skipped), and only then is
the cursor moved: a forwarder killed between the two sends that batch again, and it is
stored once. While the central store is unreachable (or the censor blocks the uplink) the
daemon keeps measuring and the backlog grows, up to `store.spool_max_rows`; past that the
oldest rows are given up (counted as dropped) so the spool cannot fill the disk.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probe.errors import StoreError
from probe.pgurl import redact
from probe.store.sqlite import HEARTBEAT_COLUMNS, MEASUREMENT_COLUMNS, SUMMARY_TABLES

log = logging.getLogger(__name__)
SUMMARY_MARGIN_MS = 86_400_000  # compaction extends runs, hours and spans at most this far back


@dataclass(frozen=True, slots=True)
class Backlog:
    measurements: int  # not uploaded yet
    oldest_ms: int | None  # when the oldest of them started
    dropped: int  # given up over the spool's bound, ever

    def age_s(self, now_ms: int | None = None) -> float:
        if self.oldest_ms is None:
            return 0.0
        return max(0.0, ((now_ms if now_ms is not None else time.time() * 1000) - self.oldest_ms) / 1000)


def backlog(spool: sqlite3.Connection) -> Backlog:
    """What the spool holds that the central store does not have yet."""
    row = spool.execute("SELECT measurement_id, dropped FROM forward_cursor").fetchone()
    after, dropped = row if row else (0, 0)
    count, oldest = spool.execute(
        "SELECT count(*), min(started_at_ms) FROM measurements WHERE id > ?", [after]
    ).fetchone()
    return Backlog(count, oldest, dropped)


class Forwarder:
    """Uploads the spool's backlog. Blocking calls: the daemon runs them in threads, one at
    a time (a lock keeps a cancelled upload's thread and the final one apart)."""

    def __init__(
        self, spool: Path, url: str, vantage: str, batch: int, max_backlog: int, conninfo: str | None = None
    ) -> None:
        self.url = url
        self.conninfo = conninfo  # through the uplink (probe/fleet/uplink.py), when there is one
        self.vantage = vantage
        self.batch = batch
        self.max_backlog = max_backlog
        try:
            self._spool = sqlite3.connect(spool, timeout=30, isolation_level=None, check_same_thread=False)
            self._spool.execute(
                "INSERT OR IGNORE INTO forward_cursor (id, measurement_id, heartbeat_rowid) VALUES (1, 0, 0)"
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{spool}: cannot open the spool: {exc}") from None
        self._lock = threading.Lock()
        self._central: Any = None  # a CentralStore once connected
        self._paths_sent: list[tuple[Any, ...]] | None = None  # the paths as last uploaded

    def backlog(self) -> Backlog:
        with self._lock:
            return backlog(self._spool)

    def forward(self) -> int:
        """Upload batches until the backlog is empty, then the summaries compaction added;
        the measurements sent. A failure of the central store raises StoreError with nothing
        lost: the next call starts over there."""
        with self._lock:
            return self._forward()

    def _forward(self) -> int:
        sent = 0
        self._bound()
        while True:
            measurements, full = self._forward_batch()
            sent += measurements
            if not full:
                break
        self._forward_summaries()
        return sent

    def _forward_summaries(self) -> None:
        """The spool's summaries (analysis/rollup.py) recent as of the last upload, if its
        compaction has moved on since: the central store answers a year from them."""
        cursor = self._spool.execute("SELECT until_ms, slot_s FROM rollup_cursor").fetchone()
        (sent_until,) = self._spool.execute("SELECT summaries_ms FROM forward_cursor").fetchone()
        if cursor is None or cursor[0] == sent_until:
            return
        since = (sent_until or 0) - SUMMARY_MARGIN_MS
        tables = {
            table: self._spool.execute(
                f"SELECT {', '.join(columns)} FROM {table} WHERE {recent} >= ?", [since]
            ).fetchall()
            for table, columns, _, recent in SUMMARY_TABLES
        }
        self._connect().replace_summaries(self.vantage, since, tables, cursor)
        with self._spool:
            self._spool.execute("BEGIN IMMEDIATE")
            self._spool.execute("UPDATE forward_cursor SET summaries_ms = ?", [cursor[0]])

    def _forward_batch(self) -> tuple[int, bool]:
        """One batch: the measurements sent, and whether the batch was full (more may wait)."""
        measurement_id, heartbeat_rowid = self._spool.execute(
            "SELECT measurement_id, heartbeat_rowid FROM forward_cursor"
        ).fetchone()
        rows = self._spool.execute(
            f"SELECT id, {', '.join(MEASUREMENT_COLUMNS)} FROM measurements WHERE id > ? ORDER BY id LIMIT ?",
            [measurement_id, self.batch],
        ).fetchall()
        last_id = rows[-1][0] if rows else measurement_id
        beats = self._spool.execute(
            f"SELECT rowid, {', '.join(HEARTBEAT_COLUMNS)} FROM heartbeats WHERE rowid > ? ORDER BY rowid LIMIT ?",
            [heartbeat_rowid, self.batch],
        ).fetchall()
        last_rowid = beats[-1][0] if beats else heartbeat_rowid
        paths = self._spool.execute("SELECT name, kind, label, endpoint_target FROM paths ORDER BY name").fetchall()
        if not rows and not beats and paths == self._paths_sent:
            return 0, False
        self._connect().ingest(
            self.vantage, [r[1:] for r in rows], [b[1:] for b in beats], paths if paths != self._paths_sent else []
        )
        self._paths_sent = paths  # a reload's new paths go up with the next batch
        with self._spool:
            self._spool.execute("BEGIN IMMEDIATE")
            self._spool.execute(
                "UPDATE forward_cursor SET measurement_id = ?, heartbeat_rowid = ?", [last_id, last_rowid]
            )
        return len(rows), max(len(rows), len(beats)) >= self.batch

    def _bound(self) -> None:
        """Give up the oldest of a backlog over its bound, so the spool cannot fill the disk."""
        over = backlog(self._spool).measurements - self.max_backlog
        if over <= 0:
            return
        with self._spool:
            self._spool.execute("BEGIN IMMEDIATE")
            (cut,) = self._spool.execute(
                "SELECT id FROM measurements WHERE id > (SELECT measurement_id FROM forward_cursor) "
                "ORDER BY id LIMIT 1 OFFSET ?",
                [over - 1],
            ).fetchone()
            self._spool.execute("UPDATE forward_cursor SET measurement_id = ?, dropped = dropped + ?", [cut, over])
        log.error(
            "the backlog outgrew store.spool_max_rows (%d): gave up uploading its %d oldest measurements",
            self.max_backlog,
            over,
        )

    def _connect(self) -> Any:
        if self._central is None:
            from probe.store.central import CentralStore  # psycopg: only a daemon in fleet mode needs it

            self._central = CentralStore(self.url, self.conninfo)
        return self._central

    def disconnect(self) -> None:
        """After a failure: the next batch opens a new connection."""
        with self._lock:
            self._disconnect()

    def _disconnect(self) -> None:
        if self._central is not None:
            try:
                self._central.close()
            finally:
                self._central = None

    @property
    def where(self) -> str:
        return redact(self.url)

    def close(self) -> None:
        with self._lock:
            self._disconnect()
            self._spool.close()
