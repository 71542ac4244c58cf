"""Outage intervals from verdicts, with IODA-like hysteresis, and latency degradation.

A (target, path) is in an outage from the first of `open_after` consecutive failing rounds
until the first of `close_after` consecutive good rounds. A gap in the rounds (the daemon
stopped, the machine slept) is unknown: an outage open at a gap ends one interval after its
last failing round, and rounds on either side of a gap are never counted as consecutive.
Rounds come as verdict runs (summary.py): the same code serves a week of raw rows and a year
of summaries.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd

from .summary import as_ns
from .verdicts import DEGRADED, FAILING

OUTAGE_COLUMNS = [
    "path",
    "target",
    "start",
    "end",
    "minutes",
    "verdict",
    "targets",
    "rules",
    "rounds",
    "ongoing",
    "factor",
]


@dataclass(frozen=True, slots=True)
class Hysteresis:
    open_after: int = 2
    close_after: int = 2
    gap_factor: float = 2.5  # a pause longer than this many intervals is a gap


def _interval_ns(first: np.ndarray, last: np.ndarray, rounds: np.ndarray) -> float:
    """The pair's usual step between rounds: within its runs, else between them."""
    steps = rounds - 1
    if steps.sum() > 0:
        return float((last - first).sum() / steps.sum())
    if len(first) > 1:
        return float(np.median(np.diff(first)))
    return float(pd.Timedelta(minutes=5).value)


def pair_outages(runs: pd.DataFrame, hysteresis: Hysteresis = Hysteresis()) -> pd.DataFrame:
    """Outage intervals of every (target, path), from its verdict runs (see summary.py). The
    state machine walks runs, not rounds, so a year costs little."""
    rows: list[dict[str, Any]] = []
    ordered = runs.sort_values(["target", "path", "first"])
    for (target, path), g in ordered.groupby(["target", "path"], sort=True, observed=True):
        first, last = as_ns(g["first"]), as_ns(g["last"])
        rounds = g["rounds"].to_numpy(dtype="int64")
        failing = (g["state"] == FAILING).to_numpy()
        interval = _interval_ns(first, last, rounds)
        gap_after = np.append(first[1:] - last[:-1] > hysteresis.gap_factor * interval, True)
        kinds, rules = g["verdict"].to_numpy(), g["rule"].to_numpy()
        for a, b, closed_at, ongoing in _walk(failing, rounds, gap_after, hysteresis):
            index = np.arange(a, b)[failing[a:b]]
            end = first[closed_at] if closed_at is not None else last[index[-1]] + interval
            counts: Counter[str] = Counter()
            for i in index:
                counts[kinds[i]] += rounds[i]
            rows.append(
                {
                    "path": path,
                    "target": target,
                    "start": pd.Timestamp(first[index[0]], tz="UTC"),
                    "end": pd.Timestamp(int(end), tz="UTC"),
                    "verdict": counts.most_common(1)[0][0],
                    "targets": (target,),
                    "rules": tuple(sorted(set(rules[index]))),
                    "rounds": int(rounds[index].sum()),
                    "ongoing": ongoing,
                }
            )
    return _frame(rows)


def _walk(
    failing: np.ndarray, rounds: np.ndarray, gap_after: np.ndarray, h: Hysteresis
) -> list[tuple[int, int, int | None, bool]]:
    """(first run, end run, run whose first round closed it or None, ongoing) per outage.

    Consecutive runs with the same state form a streak; `open_after` failing rounds in a
    streak open an outage at its start, `close_after` good ones close it at theirs. An
    outage open at a gap ends there; open at the end of the data, it is ongoing."""
    found: list[tuple[int, int, int | None, bool]] = []
    open_at: int | None = None
    i, n = 0, len(failing)
    while i < n:
        j, total = i, 0
        while True:  # the streak i..j
            total += rounds[j]
            if gap_after[j] or j + 1 == n or failing[j + 1] != failing[i]:
                break
            j += 1
        if open_at is None:
            if failing[i] and total >= h.open_after:
                open_at = i
        elif not failing[i] and total >= h.close_after:
            found.append((open_at, i, i, False))
            open_at = None
        if gap_after[j] and open_at is not None:
            found.append((open_at, j + 1, None, j + 1 == n))
            open_at = None
        i = j + 1
    return found


def path_outages(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per path: the union of its (target, path) outages, with the targets they affected."""
    rows: list[dict[str, Any]] = []
    for path, group in pairs.sort_values("start").groupby("path", sort=True):
        current: dict[str, Any] | None = None
        for _, o in group.iterrows():
            if current is not None and o["start"] <= current["end"]:
                current["end"] = max(current["end"], o["end"])
                current["targets"] = tuple(sorted(set(current["targets"]) | set(o["targets"])))
                current["rules"] = tuple(sorted(set(current["rules"]) | set(o["rules"])))
                current["rounds"] += o["rounds"]
                current["ongoing"] = current["ongoing"] or o["ongoing"]
                current["_minutes"][o["verdict"]] += o["minutes"]
                continue
            current = {**cast(dict[str, Any], o.to_dict()), "path": path, "target": "*"}
            current["_minutes"] = Counter({o["verdict"]: o["minutes"]})  # which verdict held longest
            rows.append(current)  # and grown in place while the next ones overlap it
    for row in rows:
        row["verdict"] = row.pop("_minutes").most_common(1)[0][0]
    return _frame(rows)


def degraded(
    latency: pd.DataFrame,
    *,
    window: str = "1h",
    baseline: str = "7D",
    factor: float = 3.0,
    metrics: tuple[str, ...] = ("connect", "first_byte", "total"),
    min_windows: int = 6,
    min_increase_ms: float = 50.0,
) -> pd.DataFrame:
    """Windows where a path's median of some metric exceeds `factor` x its rolling baseline,
    and by at least `min_increase_ms` (from 2 ms to 7 ms is noise, not throttling).

    `latency` holds percentiles per window (summary.py: the probes that worked); a metric's
    baseline is the median of the preceding windows' medians over `baseline`, so a degraded
    window does not raise its own bar. Connect and first-byte times show a slow network,
    the total time (the whole page) shows throttled bandwidth.
    """
    rows: list[dict[str, Any]] = []
    step = pd.Timedelta(window)
    for path, group in latency.groupby("path", sort=True):
        medians = group.set_index("hour").sort_index()
        by_metric = {}
        for metric in (m for m in metrics if f"{m}_p50" in medians):
            median = medians[f"{metric}_p50"].astype(float)
            reference = median.dropna().rolling(baseline, min_periods=min_windows).median().shift(1)
            by_metric[metric] = (median / reference).where(median - reference >= min_increase_ms)
        ratios = pd.DataFrame(by_metric)
        worst = ratios.max(axis=1)
        current: dict[str, Any] | None = None
        over_by_window = ratios.gt(factor)
        for at in worst[worst > factor].index:
            over = tuple(f"{m}_ms>{factor:g}x-{baseline}-median" for m in ratios.columns[over_by_window.loc[at]])
            if current is not None and at == current["end"]:
                current["end"] = at + step
                current["factor"] = max(current["factor"], float(worst[at]))
                current["rules"] = tuple(sorted(set(current["rules"]) | set(over)))
                current["rounds"] += 1
                continue
            current = {
                "path": path,
                "target": "*",
                "start": at,
                "end": at + step,
                "verdict": DEGRADED,
                "targets": (),
                "rules": over,
                "rounds": 1,
                "ongoing": False,
                "factor": float(worst[at]),
            }
            rows.append(current)  # and grown in place while the next windows follow it
    return _frame(rows)


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=[c for c in OUTAGE_COLUMNS if c != "minutes"])
    if frame.empty:
        return pd.DataFrame(columns=OUTAGE_COLUMNS)
    frame["minutes"] = (frame["end"] - frame["start"]).dt.total_seconds() / 60
    return frame[OUTAGE_COLUMNS].reset_index(drop=True)
