"""Outage intervals from verdicts, with IODA-like hysteresis, and latency degradation.

A (target, path) is in an outage from the first of `open_after` consecutive failing rounds
until the first of `close_after` consecutive good rounds. A gap in the rounds (the daemon
stopped, the machine slept) is unknown: an outage open at a gap ends one interval after its
last failing round, and rounds on either side of a gap are never counted as consecutive.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

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


def _close(rows: list[dict], start: pd.Timestamp, end: pd.Timestamp, failing: list[pd.Series], ongoing: bool) -> None:
    verdicts = Counter(r["verdict"] for r in failing)
    rows.append({
        "path": failing[0]["path"],
        "target": failing[0]["target"],
        "start": start,
        "end": end,
        "verdict": verdicts.most_common(1)[0][0],
        "targets": (failing[0]["target"],),
        "rules": tuple(sorted({r["rule"] for r in failing})),
        "rounds": len(failing),
        "ongoing": ongoing,
    })  # fmt: skip


def pair_outages(verdicts: pd.DataFrame, hysteresis: Hysteresis = Hysteresis()) -> pd.DataFrame:
    """Outage intervals of every (target, path)."""
    rows: list[dict] = []
    for _, series in verdicts.sort_values("started_at").groupby(["target", "path"], sort=True):
        _series_outages(series.reset_index(drop=True), hysteresis, rows)
    return _frame(rows)


def _series_outages(series: pd.DataFrame, h: Hysteresis, rows: list[dict]) -> None:
    interval = _interval(series["started_at"])
    run: list[pd.Series] = []  # consecutive failing rounds not yet an outage
    failing: list[pd.Series] = []  # failing rounds of the open outage
    good = 0
    previous: pd.Timestamp | None = None
    for _, row in series.iterrows():
        at = row["started_at"]
        if previous is not None and at - previous > h.gap_factor * interval:
            if failing:
                _close(rows, failing[0]["started_at"], failing[-1]["started_at"] + interval, failing, False)
            run, failing, good = [], [], 0
        previous = at
        if row["state"] == FAILING:
            good = 0
            if failing:
                failing.append(row)
            else:
                run.append(row)
                if len(run) >= h.open_after:
                    failing, run = run, []
        else:
            run = []
            if failing:
                good += 1
                if good == 1:
                    first_good = at
                if good >= h.close_after:
                    _close(rows, failing[0]["started_at"], first_good, failing, False)
                    failing, good = [], 0
    if failing:
        _close(rows, failing[0]["started_at"], failing[-1]["started_at"] + interval, failing, True)


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
