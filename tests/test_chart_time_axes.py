"""The latency chart's time axes over the dashboard's ranges: the axes above the last draw their
ticks and grid lines without labels (charts._time_axis, not labelled), and only the last one
says the times, its month or year included. Asserted on what the saved chart shows."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from analysis.charts import latency_smoke

TZ = "Asia/Shanghai"
PATHS = ["direct", "vpn", "wg"]


def _month(start: pd.Timestamp, days: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hourly counts and latency percentiles of every path over `days` days from `start`."""
    hours = pd.date_range(start, periods=days * 24, freq="1h")
    rng = np.random.default_rng(5)
    hourly = pd.DataFrame(
        [(h, "control", p, 12, int(rng.integers(0, 3))) for h in hours for p in PATHS],
        columns=["hour", "group", "path", "probes", "failing"],
    )
    median = rng.uniform(20, 200, size=(len(hours) * len(PATHS), 1))
    latency = pd.DataFrame(
        median * np.array([[0.6, 0.8, 1.0, 1.3, 1.8]]), columns=[f"connect_p{q}" for q in (10, 25, 50, 75, 90)]
    ).assign(hour=np.repeat(hours, len(PATHS)), path=np.tile(PATHS, len(hours)), samples=24)
    return hourly, latency


@pytest.mark.parametrize("days", [7, 30], ids=["a-week", "a-month"])
def test_only_the_last_latency_axes_labels_the_times(days: int) -> None:
    start = pd.Timestamp("2018-06-09 16:00", tz="UTC")
    end = start + pd.Timedelta(days=days)
    hourly, latency = _month(start, days)
    fig = latency_smoke(latency, hourly, start, end, TZ)
    fig.savefig(io.BytesIO(), format="png")  # drawn: tick labels and offsets as the picture shows them
    *upper, last = fig.axes
    assert [t.get_text() for t in last.get_xticklabels() if t.get_visible() and t.get_text()]
    assert last.get_xlabel().startswith(f"time ({TZ})")
    if days > 15:  # a range past a fortnight: ConciseDateFormatter's year and month, under the last axes
        assert last.xaxis.offsetText.get_visible() and last.xaxis.offsetText.get_text() == "2018-Jul"
    for ax in upper:
        assert not [t.get_text() for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
        offset = ax.xaxis.offsetText
        assert not (offset.get_visible() and offset.get_text()), f"{ax.get_title(loc='left')}: {offset.get_text()}"
        assert ax.get_xlim() == last.get_xlim()
