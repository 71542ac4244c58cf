"""The alerts' evaluation: `tunnelwatch alerts evaluate` (analysis/alerts.py) in a child
process once per probing interval (probe.interval_s) when rounds have been stored since the
last one, or every alerts.group_s when that is set, then the notifier woken to send what it
queued. Each target is a round of its own, spread over the interval: evaluating after each
would run the child back to back.

One evaluation at a time: rounds that are stored while one runs make one more run after it,
not a queue. The child has its own memory (pandas) and its own time, so probing never waits
for it; its failure is logged (probe/daemon/jobs.py) and the next round tries again. Alerts
are recorded with no alerts.urls too (`alerts list`, `status`); only sending needs URLs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from probe.config import Config
from probe.daemon.jobs import ChildJobs


class Evaluations:
    def __init__(self, config: Config, jobs: ChildJobs, then: Callable[[], None]) -> None:
        self._group_s = config.alerts.group_s
        self._interval_s = config.probe.interval_s
        self._last = -float("inf")  # when the last evaluation started (monotonic)
        self._jobs = jobs
        self._then = then
        self._wanted = asyncio.Event()

    def round_stored(self) -> None:
        """A round is in the store: evaluate (at once, or after the one running)."""
        self._wanted.set()

    def apply(self, config: Config) -> None:
        self._group_s = config.alerts.group_s
        self._interval_s = config.probe.interval_s

    async def run(self) -> None:
        """Evaluate when a round is stored (or every alerts.group_s). Cancel to stop."""
        while True:
            if self._group_s > 0:
                await asyncio.sleep(self._group_s)
            else:
                await self._wanted.wait()
                if (wait_s := self._last + self._interval_s - time.monotonic()) > 0:
                    await asyncio.sleep(wait_s)  # the interval's other rounds come meanwhile
            self._wanted.clear()
            self._last = time.monotonic()
            await self._jobs.evaluate_alerts()
            self._then()
