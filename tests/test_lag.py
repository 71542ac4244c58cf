"""The event loop's lateness, as measurements carry it, and what analysis does with it."""

from __future__ import annotations

import asyncio
import time

import pandas as pd

from analysis.summary import LAG_LIMIT_MS, hourly_latency
from probe.measure.lag import LagMonitor


def test_a_blocked_loop_shows_as_lag_and_a_quiet_one_does_not() -> None:
    async def scenario() -> tuple[float | None, float | None]:
        monitor = LagMonitor()
        monitor.ensure_running()
        await asyncio.sleep(0.05)
        quiet_from = time.perf_counter()
        await asyncio.sleep(0.1)
        quiet = monitor.worst(quiet_from)
        busy_from = time.perf_counter()
        time.sleep(0.06)  # a callback hogging the loop, as a burst of TLS handshakes would
        await asyncio.sleep(0.02)
        busy = monitor.worst(busy_from)
        monitor.stop()
        return quiet, busy

    quiet, busy = asyncio.run(scenario())
    assert quiet is not None and quiet < 20  # a shared CI machine wakes a little late too
    assert busy is not None and busy > 40


def test_nothing_sampled_is_none() -> None:
    assert LagMonitor().worst(time.perf_counter()) is None


def test_latency_figures_leave_out_totals_taken_while_the_loop_was_late() -> None:
    """The phases are the kernel's (probe/measure/conn.py) and stay; the loop-timed total goes."""
    at = pd.Timestamp("2018-03-05 10:00", tz="UTC")
    frame = pd.DataFrame(
        {
            "started_at": [at] * 4,
            "path": "direct",
            "group": "control",
            "ok": True,
            "connect_ms": [10.0, 10.0, 10.0, 12.0],
            "first_byte_ms": 20.0,
            "total_ms": [30.0, 30.0, 30.0, 500.0],
            "loop_lag_ms": [0.5, None, LAG_LIMIT_MS, LAG_LIMIT_MS + 200],
        }
    )
    (row,) = hourly_latency(frame).to_dict("records")
    assert row["samples"] == 4 and row["connect_p90"] > 10.0 and row["total_p90"] == 30.0
