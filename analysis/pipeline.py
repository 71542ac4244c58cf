"""From the store to answers: verdicts, outages per (target, path) and per path, degradation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

from .frames import load_heartbeats, load_measurements, load_paths
from .outages import Hysteresis, degraded, pair_outages, path_outages
from .verdicts import classify


@dataclass(frozen=True, slots=True)
class Analysis:
    measurements: pd.DataFrame
    heartbeats: pd.DataFrame
    verdicts: pd.DataFrame
    pairs: pd.DataFrame  # outages per (target, path)
    paths: pd.DataFrame  # outages per path, degradation included

    @property
    def span(self) -> tuple[pd.Timestamp, pd.Timestamp] | None:
        if self.heartbeats.empty:
            return None
        return self.heartbeats["started_at"].min(), self.heartbeats["finished_at"].max()


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
) -> Analysis:
    # Verdicts compare a target's paths and look at control targets: read every target and
    # path of the time range, and filter the results.
    measurements = load_measurements(db, since, until)
    heartbeats = load_heartbeats(db, since, until)
    verdicts = classify(measurements, load_paths(db), slot_s)
    pairs = pair_outages(verdicts, hysteresis)
    by_path = pd.concat(
        [frame for frame in (path_outages(pairs), degraded(measurements, factor=degraded_factor)) if not frame.empty]
        or [path_outages(pairs)],
        ignore_index=True,
    )
    if targets:
        verdicts = verdicts[verdicts["target"].isin(targets)]
        pairs = pairs[pairs["target"].isin(targets)]
        by_path = by_path[by_path["targets"].map(lambda ts: bool(set(ts) & set(targets)))]
    if paths:
        verdicts = verdicts[verdicts["path"].isin(paths)]
        pairs = pairs[pairs["path"].isin(paths)]
        by_path = by_path[by_path["path"].isin(paths)]
    return Analysis(measurements, heartbeats, verdicts, pairs.reset_index(drop=True), by_path.reset_index(drop=True))
