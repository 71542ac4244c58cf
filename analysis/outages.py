"""Outage intervals from verdicts, with IODA-like hysteresis, and latency degradation.

A (target, path) is in an outage from the first of `open_after` consecutive failing rounds
until the first of `close_after` consecutive good rounds. A gap in the rounds (the daemon
stopped, the machine slept) is unknown: an outage open at a gap ends one interval after its
last failing round, and rounds on either side of a gap are never counted as consecutive.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .verdicts import DEGRADED, FAILING

OUTAGE_COLUMNS = ["path", "target", "start", "end", "minutes", "verdict", "targets", "rules", "rounds", "ongoing",
                  "factor"]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Hysteresis:
    open_after: int = 2
    close_after: int = 2
    gap_factor: float = 2.5  # a pause longer than this many intervals is a gap


def _interval(times: pd.Series) -> pd.Timedelta:
    steps = times.diff().dropna()
    return steps.median() if len(steps) else pd.Timedelta(minutes=5)


def _runs(values: np.ndarray) -> list[tuple[bool, int, int]]:
    """(value, first index, length) of each run of equal booleans."""
    if not len(values):
        return []
    edges = np.flatnonzero(np.diff(values.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    lengths = np.diff(np.concatenate([starts, [len(values)]]))
    return [(bool(values[a]), int(a), int(n)) for a, n in zip(starts, lengths, strict=True)]


def pair_outages(verdicts: pd.DataFrame, hysteresis: Hysteresis = Hysteresis()) -> pd.DataFrame:
    """Outage intervals of every (target, path). The state machine walks runs of equal
    states, not rows, so a year of rounds costs little."""
    rows: list[dict] = []
    ordered = verdicts.sort_values(["target", "path", "started_at"])
    for (target, path), series in ordered.groupby(["target", "path"], sort=True):
        times = series["started_at"].reset_index(drop=True)
        failing = (series["state"] == FAILING).to_numpy()
        interval = _interval(times)
        gaps = np.flatnonzero(times.diff().to_numpy()[1:] > hysteresis.gap_factor * interval) + 1
        bounds = [0, *gaps.tolist(), len(times)]
        kinds, rules = series["verdict"].to_numpy(), series["rule"].to_numpy()
        for segment, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
            last_segment = segment == len(bounds) - 2
            for start, end, ongoing in _segment_outages(failing[a:b], hysteresis, last_segment):
                index = np.arange(a + start, a + end)
                index = index[failing[index]]
                closed_at = times[a + end] if end < b - a and not ongoing else times[index[-1]] + interval
                verdicts_in = Counter(kinds[index])
                rows.append({
                    "path": path, "target": target, "start": times[index[0]], "end": closed_at,
                    "verdict": verdicts_in.most_common(1)[0][0], "targets": (target,),
                    "rules": tuple(sorted(set(rules[index]))), "rounds": len(index), "ongoing": ongoing,
                })  # fmt: skip
    return _frame(rows)


def _segment_outages(failing: np.ndarray, h: Hysteresis, last_segment: bool) -> list[tuple[int, int, bool]]:
    """(first index, index of the closing good round or the segment's end, still ongoing)."""
    found = []
    open_at: int | None = None
    for value, first, length in _runs(failing):
        if open_at is None:
            if value and length >= h.open_after:
                open_at = first
        elif not value and length >= h.close_after:
            found.append((open_at, first, False))
            open_at = None
    if open_at is not None:
        # Open at the end of a segment: ongoing if this is the newest data, else ended by a gap.
        found.append((open_at, len(failing), last_segment))
    return found


def path_outages(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per path: the union of its (target, path) outages, with the targets they affected."""
    rows: list[dict] = []
    for path, group in pairs.sort_values("start").groupby("path", sort=True):
        current: dict | None = None
        for _, o in group.iterrows():
            if current is not None and o["start"] <= current["end"]:
                current["end"] = max(current["end"], o["end"])
                current["targets"] = tuple(sorted(set(current["targets"]) | set(o["targets"])))
                current["rules"] = tuple(sorted(set(current["rules"]) | set(o["rules"])))
                current["rounds"] += o["rounds"]
                current["ongoing"] = current["ongoing"] or o["ongoing"]
                current["_minutes"][o["verdict"]] += o["minutes"]
                continue
            if current is not None:
                rows.append(current)
            current = {**o.to_dict(), "path": path, "target": "*", "_minutes": Counter({o["verdict"]: o["minutes"]})}
        if current is not None:
            rows.append(current)
    for row in rows:
        row["verdict"] = row.pop("_minutes").most_common(1)[0][0]
    return _frame(rows)


def degraded(
    measurements: pd.DataFrame,
    *,
    window: str = "1h",
    baseline: str = "7D",
    factor: float = 3.0,
    metric: str = "connect_ms",
    min_windows: int = 6,
) -> pd.DataFrame:
    """Windows where a path's median `metric` exceeds `factor` x its rolling baseline median.

    Only successful probes count; the baseline is the median of the preceding windows'
    medians over `baseline`, so a degraded window does not raise its own bar.
    """
    rows: list[dict] = []
    ok = measurements[measurements["ok"] & measurements[metric].notna() & (measurements["group"] != "endpoint")]
    for path, group in ok.groupby("path", sort=True):
        medians = group.set_index("started_at")[metric].resample(window).median().dropna()
        reference = medians.rolling(baseline, min_periods=min_windows).median().shift(1)
        ratio = (medians / reference).dropna()
        slow = ratio[ratio > factor]
        step = pd.Timedelta(window)
        current: dict | None = None
        for at, value in slow.items():
            if current is not None and at == current["end"]:
                current["end"] = at + step
                current["factor"] = max(current["factor"], value)
                current["rounds"] += 1
                continue
            if current is not None:
                rows.append(current)
            current = {"path": path, "target": "*", "start": at, "end": at + step, "verdict": DEGRADED,
                       "targets": (), "rules": (f"{metric}>{factor:g}x-{baseline}-median",), "rounds": 1,
                       "ongoing": False, "factor": float(value)}  # fmt: skip
        if current is not None:
            rows.append(current)
    return _frame(rows)


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=[c for c in OUTAGE_COLUMNS if c != "minutes"])
    if frame.empty:
        return pd.DataFrame(columns=OUTAGE_COLUMNS)
    frame["minutes"] = (frame["end"] - frame["start"]).dt.total_seconds() / 60
    return frame[OUTAGE_COLUMNS].reset_index(drop=True)
