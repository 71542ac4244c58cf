"""From the store to answers: outages per (target, path) and per path, degradation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

from .frames import load_summary
from .outages import Hysteresis, degraded, pair_outages, path_outages
from .rollup import Summary

BASELINE = pd.Timedelta(days=7)


@dataclass(frozen=True, slots=True)
class Analysis:
    summary: Summary
    pairs: pd.DataFrame  # outages per (target, path)
    paths: pd.DataFrame  # outages per path, degradation included

    @property
    def span(self) -> tuple[pd.Timestamp, pd.Timestamp] | None:
        return self.summary.span


def analyse(
    db: Path,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    targets: tuple[str, ...] = (),
    paths: tuple[str, ...] = (),
    hysteresis: Hysteresis = Hysteresis(),
    slot_s: float = 300,
    degraded_factor: float = 3.0,
    degraded_min_ms: float = 50.0,
) -> Analysis:
    # Verdicts compare a target's paths and look at control targets, so summaries cover
    # every target and path; the filters apply to the results. Latency is read from a week
    # earlier: degradation is judged against the 7 days before.
    start = None if since is None else pd.Timestamp(since)
    wide = load_summary(db, None if start is None else start - BASELINE, until, slot_s)
    summary = wide if start is None else wide.clip(start, pd.Timestamp(until or pd.Timestamp.max.tz_localize("UTC")))
    pairs = pair_outages(summary.runs, hysteresis)
    slow = degraded(wide.latency, baseline=f"{BASELINE.days}D", factor=degraded_factor,
                    min_increase_ms=degraded_min_ms)  # fmt: skip
    if start is not None and len(slow):
        slow = slow[slow["end"] > start].assign(start=lambda f: f["start"].clip(lower=start))
        slow["minutes"] = (slow["end"] - slow["start"]).dt.total_seconds() / 60
    by_path = pd.concat([f for f in (path_outages(pairs), slow) if not f.empty] or [path_outages(pairs)],
                        ignore_index=True)  # fmt: skip
    if targets:
        pairs = pairs[pairs["target"].isin(targets)]
        by_path = path_outages(pairs)
    if paths:
        pairs = pairs[pairs["path"].isin(paths)]
        by_path = by_path[by_path["path"].isin(paths)]
    summary = summary.only(targets, paths)
    return Analysis(summary, pairs.reset_index(drop=True), by_path.reset_index(drop=True))
