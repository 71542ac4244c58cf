"""How late the event loop wakes up, and systemd's watchdog petted from the loop itself: a
loop that hangs stops the pings, and systemd restarts the daemon."""

from __future__ import annotations

import asyncio

from probe.daemon.metrics import Metrics
from probe.daemon.systemd import notify, watchdog_interval_s

LOOP_LAG_CHECK_S = 1.0


async def watch_loop(metrics: Metrics) -> None:
    """Every second (or half the watchdog's timeout, when shorter): the loop's lag into
    `tunnelwatch_event_loop_lag_seconds`, and WATCHDOG=1 when systemd asked for it. Cancel to stop."""
    loop = asyncio.get_running_loop()
    watchdog = watchdog_interval_s()
    period = min(LOOP_LAG_CHECK_S, watchdog) if watchdog else LOOP_LAG_CHECK_S
    while True:
        started = loop.time()
        await asyncio.sleep(period)
        metrics.loop_lag.set(max(0.0, loop.time() - started - period))
        if watchdog:
            notify("WATCHDOG=1")
