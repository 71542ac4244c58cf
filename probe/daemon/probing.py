"""The rounds the schedule starts: a unit's target through every path, handed to the store
writer, counted in the metrics and logged in one line. At stop, no new round starts and
those in flight get daemon.drain_timeout_s to finish (they are stored), then are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from probe.daemon.metrics import Metrics
from probe.daemon.schedule import Unit
from probe.daemon.writer import StoreWriter
from probe.logs import counted
from probe.measure.rounds import ProbeContext, run_round
from probe.model import Measurement

log = logging.getLogger("tunnelwatch.daemon")


class Rounds:
    def __init__(self, ctx: ProbeContext, writer: StoreWriter, metrics: Metrics, stopping: asyncio.Event) -> None:
        self.ctx = ctx  # a reload replaces it; a round runs on the one it started with
        self._writer = writer
        self._metrics = metrics
        self._stopping = stopping
        self._in_flight: set[asyncio.Task[Any]] = set()

    async def run(self, unit: Unit) -> None:
        """One round of `unit`, unless the daemon is stopping."""
        task = asyncio.current_task()
        if task is None or self._stopping.is_set():
            return
        self._in_flight.add(task)
        try:
            now = datetime.now(UTC)
            scheduled = unit.scheduled_for(now)
            self._metrics.schedule_lag.observe((now - scheduled).total_seconds())
            started = time.perf_counter()
            pairs = [(unit.target, path) for path in unit.paths]
            measurements, heartbeat = await run_round(self.ctx, pairs, target=unit.target.name, scheduled_at=scheduled)
            elapsed = time.perf_counter() - started
            self._writer.submit(measurements, heartbeat)
            group = unit.target.group
            self._metrics.rounds.labels(group).inc()
            self._metrics.round_duration.labels(group).observe(elapsed)
            for m in measurements:
                self._metrics.observe(m)
            _log_round(unit, measurements, elapsed)
        finally:
            self._in_flight.discard(task)

    async def drain(self, timeout_s: float) -> None:
        """Let the rounds in flight finish, for `timeout_s` at most; cancel the others."""
        in_flight = set(self._in_flight)
        if not in_flight:
            return
        log.info("stopping: letting %s in flight finish", counted(len(in_flight), "round"))
        _, late = await asyncio.wait(in_flight, timeout=timeout_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


def _log_round(unit: Unit, measurements: list[Measurement], elapsed: float) -> None:
    failed = [f"{m.path}={m.failure}@{m.failed_operation}" for m in measurements if not m.ok]
    log.info(
        "round %s: %d/%s ok in %.2f s%s",
        unit.target.name,
        len(measurements) - len(failed),
        counted(len(measurements), "path"),
        elapsed,
        f"; failing: {', '.join(failed)}" if failed else "",
    )
    if elapsed > unit.interval_s:
        log.warning(
            "round %s took %.1f s, longer than its %.0f s interval: the next start is skipped",
            unit.target.name,
            elapsed,
            unit.interval_s,
        )
