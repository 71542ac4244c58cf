"""The single store writer of the daemon.

Rounds hand their measurements over and go on probing; the writer writes them in batches
off the event loop. While the store cannot be written (disk full, file locked by another
program) it keeps them in a bounded buffer, logs once per outage, and retries with backoff.

Before its first write, and after each reopen, it has the store checked in full (a thread;
rounds wait in the buffer meanwhile). When the store is lost (its file deleted, replaced by
another, or damaged) it logs an error, counts it in `tunnelwatch_store_reopened_total` and
goes on in a store at the same path, where what was not written yet is written: measuring
never stops for a store, and nothing is written into a file that is gone or damaged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from probe.daemon.backoff import Outage, retry
from probe.daemon.metrics import Metrics
from probe.errors import StoreError
from probe.model import Heartbeat, Measurement
from probe.store.file import StoreLost
from probe.store.sqlite import Store

log = logging.getLogger(__name__)

Batch = tuple[list[Measurement], Heartbeat]
T = TypeVar("T")


class StoreWriter:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        max_buffer: int,
        retry_s: float,
        on_written: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._on_written = on_written  # told after each write of rounds (the alerts' evaluation)
        self._metrics = metrics
        self._max_buffer = max_buffer
        self._retry_s = retry_s
        self._pending: deque[Batch] = deque()
        self._buffered = 0
        self._wake = asyncio.Event()
        self._outage = Outage()  # of writes
        self._paths: list[tuple[str, str, str, str | None]] = []
        self._checking: asyncio.Future[None] | None = None
        self._checked = False
        self._lost: StoreLost | None = None  # counted and logged once, until a store is back
        self._in_flight: asyncio.Future[Any] | None = None  # the store call under way (one thread)

    @property
    def buffered(self) -> int:
        return self._buffered

    def submit(self, measurements: list[Measurement], heartbeat: Heartbeat) -> None:
        self._pending.append((measurements, heartbeat))
        self._buffered += len(measurements)
        while self._buffered > self._max_buffer and len(self._pending) > 1:
            dropped, _ = self._pending.popleft()
            self._buffered -= len(dropped)
            self._metrics.store_dropped.inc(len(dropped))
            log.error("store buffer full (%d measurements): dropped the oldest round", self._max_buffer)
        self._metrics.store_buffered.set(self._buffered)
        self._wake.set()

    def submit_paths(self, paths: list[tuple[str, str, str, str | None]]) -> None:
        """Record what the paths are (after a reload) with the next write."""
        self._paths = paths
        self._wake.set()

    async def flush(self) -> bool:
        """Write everything pending in one transaction. False when the store refused it."""
        for _ in range(2):  # a lost store is reopened once, then written
            try:
                return await self._flush()
            except StoreLost as lost:
                if not await self._reopen(lost):
                    return False
        return False

    async def _flush(self) -> bool:
        await self._settled()
        if not self._checked:
            await self._check()
        if self._paths:
            try:
                await self._call(self._record_paths(self._paths))
            except StoreLost:
                raise
            except StoreError as exc:
                log.error("%s; will retry", exc)
                return False
        if not self._pending:
            return True
        return await self._call(self._write(list(self._pending)))

    async def _call(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a store call as a task of its own: a flush cancelled meanwhile (the daemon
        stopping) leaves it to finish on the one connection and to account for what it did,
        and the next flush waits for it first, so nothing is written twice or beside it."""
        self._in_flight = asyncio.ensure_future(work)
        return await asyncio.shield(self._in_flight)

    async def _settled(self) -> None:
        """Wait for a store call a cancelled flush left running; what it failed to store is
        still pending (a lost store is noticed again by the next call)."""
        if self._in_flight is not None and not self._in_flight.done():
            with contextlib.suppress(StoreError):
                await asyncio.shield(self._in_flight)
        if self._in_flight is not None and self._in_flight.done() and not self._in_flight.cancelled():
            self._in_flight.exception()  # retrieved: a failure was handled where it was awaited, or is moot now
        self._in_flight = None

    async def _record_paths(self, paths: list[tuple[str, str, str, str | None]]) -> None:
        await asyncio.to_thread(self._store.record_paths, paths)
        if self._paths is paths:
            self._paths = []

    async def _write(self, batches: list[Batch]) -> bool:
        measurements = [m for batch, _ in batches for m in batch]
        heartbeats = [heartbeat for _, heartbeat in batches]
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._store.write, measurements, heartbeats)
        except StoreLost:
            raise
        except StoreError as exc:
            self._metrics.store_errors.inc()
            if self._outage.failed():
                log.error("%s; keeping up to %d measurements in memory and retrying", exc, self._max_buffer)
            return False
        self._metrics.store_write.observe(time.perf_counter() - started)
        written = {id(heartbeat) for heartbeat in heartbeats}
        while self._pending and id(self._pending[0][1]) in written:  # a full buffer may have dropped some
            self._buffered -= len(self._pending.popleft()[0])
        self._metrics.store_buffered.set(self._buffered)
        if (lasted := self._outage.recovered()) is not None:
            log.warning("store writable again after %.0f s; wrote %d buffered measurements", lasted, len(measurements))
        self._on_written()
        return True

    async def _check(self) -> None:
        """The store's full check, in a thread. One at a time: a flush cancelled while it
        runs (the daemon stopping) leaves it to the final flush."""
        if self._checking is None:
            self._checking = asyncio.ensure_future(asyncio.to_thread(self._store.verify))
        try:
            await asyncio.shield(self._checking)
        except StoreLost:
            raise  # _reopen checks anew
        except StoreError as exc:
            log.warning("%s; writing without the full check", exc)
        self._checked = True

    async def _reopen(self, lost: StoreLost) -> bool:
        """Go on in a store at the same path, checked anew; the loss is counted and logged once."""
        self._checked, self._checking = False, None
        first = self._lost is None
        if first:
            self._lost = lost
            self._metrics.store_reopened.labels(lost.reason).inc()
        await self._settled()
        try:
            done = await self._call(asyncio.to_thread(self._store.reopen))
        except StoreError as exc:
            if first:
                log.error(
                    "%s: %s; cannot go on in a store there: %s; keeping up to %d measurements in memory and retrying",
                    lost.path,
                    lost.detail,
                    exc,
                    self._max_buffer,
                )
            return False
        log.error(
            "%s: %s; %s; the %d measurements not yet written go into it", lost.path, lost.detail, done, self._buffered
        )
        self._lost = None
        return True

    async def run(self) -> None:
        """Write whenever rounds submit; back off while the store is failing. Cancel to stop."""
        self._wake.set()  # check the store now, not at the first round
        while True:
            await self._wake.wait()
            self._wake.clear()
            await retry(self.flush, self._retry_s)
