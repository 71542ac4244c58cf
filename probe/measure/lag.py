"""How late the event loop runs. A probe's phases are timed by the kernel (probe/measure/conn.py),
but its total time and a DNS lookup's time are taken by callbacks, so while the loop runs
late they are inflated by about as much.

A sampler sleeps PERIOD_S at a time and notes how much later than asked it woke, into
10-ms buckets of a ring; `worst(since)` is the largest lateness noted since then. A
measurement carries it as `loop_lag_ms`, and analysis leaves the total time of one taken
while the loop was more than analysis.summary.LAG_LIMIT_MS late out of its latency figures.
"""

from __future__ import annotations

import asyncio
import time

PERIOD_S = 0.005
BUCKET_S = 0.01
BUCKETS = 6000  # a minute of 10-ms buckets; a probe is bounded by its timeout (at most 600 s: see worst)


class LagMonitor:
    def __init__(self) -> None:
        self._ring = [0.0] * BUCKETS
        self._stamp = [-1] * BUCKETS  # which bucket number each slot holds now
        self._last_wake: float | None = None
        self._task: asyncio.Task[None] | None = None

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._sample(), name="loop lag sampler")

    async def _sample(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(PERIOD_S)
            now = time.perf_counter()
            self._last_wake = now
            late_ms = max(0.0, (now - asked - PERIOD_S) * 1000)
            bucket = int(now / BUCKET_S)
            slot = bucket % BUCKETS
            if self._stamp[slot] != bucket:
                self._stamp[slot], self._ring[slot] = bucket, late_ms
            elif late_ms > self._ring[slot]:
                self._ring[slot] = late_ms

    def worst(self, since: float) -> float | None:
        """The largest lateness (ms) noted from `since` (a perf_counter time) to now, or the
        lateness now, if the sampler is overdue; None when the sampler is not running."""
        if self._last_wake is None:
            return None
        now = time.perf_counter()
        first, last = int(since / BUCKET_S), int(now / BUCKET_S) + 1
        first = max(first, last - BUCKETS + 1)
        values = [self._ring[b % BUCKETS] for b in range(first, last + 1) if self._stamp[b % BUCKETS] == b]
        overdue = (now - self._last_wake - PERIOD_S) * 1000  # the sampler should have woken by now
        return round(max([*values, overdue, 0.0]), 3)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
