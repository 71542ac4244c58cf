"""Store and forward: a vantage point's measurements go to its local SQLite store first (the
spool, probe/store/spool.py) and from there, in batches, to the fleet's central PostgreSQL
(probe/store/central.py).

A batch is read after the spool's cursor, stored centrally in one transaction (rows already
there are skipped), and only then is the cursor moved: a forwarder killed between the two
sends that batch again, and it is stored once. While the central store is unreachable (or
the censor blocks the uplink) the daemon keeps measuring and the backlog grows, up to
`store.spool_max_rows`; past that the oldest rows are given up (counted as dropped) so the
spool cannot fill the disk.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probe.pgurl import redact
from probe.store.spool import Backlog, Spool

if TYPE_CHECKING:
    from probe.store.central import CentralStore

log = logging.getLogger(__name__)


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
        self._spool = Spool.open(spool)
        self._lock = threading.Lock()
        self._central: CentralStore | None = None  # once connected
        self._paths_sent: list[tuple[Any, ...]] | None = None  # the paths as last uploaded

    def backlog(self) -> Backlog:
        with self._lock:
            return self._spool.backlog()

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
        """The spool's summaries recent as of the last upload, if its compaction has moved on
        since: the central store answers a year from them."""
        summaries = self._spool.summaries()
        if summaries is None:
            return
        self._connect().replace_summaries(self.vantage, summaries.since_ms, summaries.tables, summaries.rollup_cursor)
        self._spool.summaries_sent(summaries)

    def _forward_batch(self) -> tuple[int, bool]:
        """One batch: the measurements sent, and whether the batch was full (more may wait)."""
        batch = self._spool.batch(self.batch)
        if not batch.measurements and not batch.heartbeats and batch.paths == self._paths_sent:
            return 0, False
        self._connect().ingest(
            self.vantage,
            batch.measurements,
            batch.heartbeats,
            batch.paths if batch.paths != self._paths_sent else [],
        )
        self._paths_sent = batch.paths  # a reload's new paths go up with the next batch
        self._spool.sent(batch)
        return len(batch.measurements), max(len(batch.measurements), len(batch.heartbeats)) >= self.batch

    def _bound(self) -> None:
        """Give up the oldest of a backlog over its bound, so the spool cannot fill the disk."""
        if over := self._spool.give_up(self.max_backlog):
            log.error(
                "the backlog outgrew store.spool_max_rows (%d): gave up uploading its %d oldest measurements",
                self.max_backlog,
                over,
            )

    def _connect(self) -> CentralStore:
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
