"""The single store writer of the daemon.

Rounds hand their measurements over and go on probing; the writer writes them in batches
off the event loop. While the store cannot be written (disk full, file locked by another
program) it keeps them in a bounded buffer, logs once per outage, and retries with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from .errors import StoreError
from .metrics import Metrics
from .model import Heartbeat, Measurement
from .store import Store

log = logging.getLogger(__name__)
MAX_RETRY_S = 300.0

Batch = tuple[list[Measurement], Heartbeat]


class StoreWriter:
    def __init__(self, store: Store, metrics: Metrics, max_buffer: int, retry_s: float) -> None:
        self._store = store
        self._metrics = metrics
        self._max_buffer = max_buffer
        self._retry_s = retry_s
        self._pending: deque[Batch] = deque()
        self._buffered = 0
        self._wake = asyncio.Event()
        self._failing_since: float | None = None
        self._paths: list[tuple[str, str, str, str | None]] = []

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
        if self._paths:
            try:
                await asyncio.to_thread(self._store.record_paths, self._paths)
                self._paths = []
            except StoreError as exc:
                log.error("%s; will retry", exc)
                return False
        if not self._pending:
            return True
        batches = list(self._pending)
        measurements = [m for batch, _ in batches for m in batch]
        heartbeats = [heartbeat for _, heartbeat in batches]
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._store.write, measurements, heartbeats)
        except StoreError as exc:
            self._metrics.store_errors.inc()
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.error("%s; keeping up to %d measurements in memory and retrying", exc, self._max_buffer)
            return False
        self._metrics.store_write.observe(time.perf_counter() - started)
        for _ in batches:
            self._pending.popleft()
        self._buffered -= len(measurements)
        self._metrics.store_buffered.set(self._buffered)
        if self._failing_since is not None:
            log.warning(
                "store writable again after %.0f s; wrote %d buffered measurements",
                time.monotonic() - self._failing_since,
                len(measurements),
            )
            self._failing_since = None
        return True

    async def run(self) -> None:
        """Write whenever rounds submit; back off while the store is failing. Cancel to stop."""
        delay = self._retry_s
        while True:
            await self._wake.wait()
            self._wake.clear()
            while not await self.flush():
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_S)
            delay = self._retry_s
