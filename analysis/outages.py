"""Outage intervals from verdicts, with IODA-like hysteresis, and latency degradation.

A (target, path) is in an outage from the first of `open_after` consecutive failing rounds
until the first of `close_after` consecutive good rounds. An outage that closed and is followed
by a new outage of the same pair with the same verdict, with no `settle_after` good rounds in a
row between them, is the same outage (start of the first, end of the last): a share of the
connections dropped at random is one long outage with its `failed_share` of failing rounds,
not flapping (see `Hysteresis`). A gap in the rounds (the daemon
stopped, the machine slept) is unknown: an outage open at a gap ends one interval after its
last failing round, and rounds on either side of a gap are never counted as consecutive.
Rounds come as verdict runs (summary.py): the same code serves a week of raw rows and a year
of summaries.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

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
    "failed_share",
]


@dataclass(frozen=True, slots=True)
class Hysteresis:
    """open_after, close_after: failing rounds in a row that open an outage, good rounds in a
    row that close it. settle_after: good rounds in a row after an outage closed before a new
    outage of the pair (same verdict) is a new one; fewer, and it goes on the closed one.

    Why 8: with a share p of rounds failing at random, the expected number of rounds before a
    run of k good ones is (1/q^k - 1)/p with q = 1 - p; at p = 1/2 that is 2^(k+1) - 2: k = 6
    gives 126 rounds, k = 8 gives 510. Half the connections dropped then closes for good once
    per 510 rounds on average (17 h at 2 minutes a round): the lab's 11 outages in 153 rounds
    become one. A solid outage is unchanged, and a real recovery costs only the wait: the 8
    rounds before "back" is final (16 minutes at 2 minutes a round). Such a pair shows
    `failed_share` near 0.5 (1.0 for a solid outage). At p = 1/4 (a dropped SYN, mostly saved
    by the resent one) the expected wait is (1/0.75^8 - 1)/0.25 = 36 rounds, so it splits now
    and then: a quarter failing is degradation as much as outage.
    """

    open_after: int = 2
    close_after: int = 2
    gap_factor: float = 2.5  # a pause longer than this many intervals is a gap
    settle_after: int = 8


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
    state machine walks runs, not rounds, so a year costs little; it is the one `_walk`
    describes, run over every pair at once with array operations."""
    if runs.empty:
        return _frame([])
    # in the order of runs.sort_values(["target", "path", "first"]), pairs numbered as groupby does
    target, targets = pd.factorize(runs["target"], sort=True)
    path, paths = pd.factorize(runs["path"], sort=True)
    first, last = as_ns(runs["first"]), as_ns(runs["last"])
    order = _by_pair_then_time(target * len(paths) + path, first)
    key = target[order] * len(paths) + path[order]
    pair = np.cumsum(np.append(True, key[1:] != key[:-1])) - 1
    first, last = first[order], last[order]
    rounds = runs["rounds"].to_numpy(dtype="int64")[order]
    failing = (runs["state"] == FAILING).to_numpy()[order]
    n = len(first)
    pair_end = np.append(pair[1:] != pair[:-1], True)  # a pair's last run
    interval = _intervals(pair, first, last, rounds)
    gap_after = pair_end.copy()
    gap_after[:-1] |= first[1:] - last[:-1] > hysteresis.gap_factor * interval[:-1]
    # streaks: consecutive runs of a pair with the same state and no gap between them
    starts = np.ones(n, dtype=bool)
    starts[1:] = gap_after[:-1] | (failing[1:] != failing[:-1])
    head = np.flatnonzero(starts)  # each streak's first run
    tail = np.append(head[1:], n) - 1  # and its last
    total = np.add.reduceat(rounds, head)
    bad = failing[head]
    opens = bad & (total >= hysteresis.open_after)
    closes = ~bad & (total >= hysteresis.close_after)
    gap = gap_after[tail]
    ends = closes | gap  # what ends an open outage, if one is open
    epoch = np.cumsum(ends) - ends  # streaks after the same number of ends
    # in each epoch, the first streak that opens does so; the epoch's last streak ends it
    opening = np.flatnonzero(opens)
    opening = opening[np.append(True, epoch[opening[1:]] != epoch[opening[:-1]])] if len(opening) else opening
    ender = np.flatnonzero(ends)[epoch[opening]]
    by_close = closes[ender]
    a = head[opening]
    b = np.where(by_close, head[ender], tail[ender] + 1)
    ongoing = ~by_close & pair_end[tail[ender]]
    if not len(a):
        return _frame([])
    verdicts = _members(a, b, failing, runs, order, rounds)[2]
    # settle: an outage closed by good rounds, then another of the pair with the same verdict,
    # no gap and no streak of settle_after good rounds between them: one outage
    gaps = np.cumsum(gap_after)
    long_good = np.zeros(n, dtype="int64")
    long_good[head[~bad & (total >= hysteresis.settle_after)]] = 1
    settles = np.cumsum(long_good)
    nxt = a[1:]
    merges = (
        by_close[:-1]
        & (pair[a[:-1]] == pair[nxt])
        & (verdicts[:-1] == verdicts[1:])
        & (gaps[nxt - 1] == gaps[b[:-1] - 1])
        & (settles[nxt - 1] == settles[b[:-1] - 1])
    )
    lead = np.flatnonzero(np.append(True, ~merges))  # each merged outage's first part
    end_part = np.append(lead[1:], len(a)) - 1  # and its last
    # a merged outage's failing runs: all from its first part's start to its last's end,
    # those between the parts too (a lone failing round that opened nothing)
    inside, owner, merged_verdicts, rules = _members(a[lead], b[end_part], failing, runs, order, rounds)
    fails = np.bincount(owner, weights=rounds[inside], minlength=len(lead)).astype("int64")
    spanned = np.append(0, np.cumsum(rounds))
    span = spanned[b[end_part]] - spanned[a[lead]]  # every round from the first part to the last's end
    last_failing = np.zeros(len(lead), dtype="int64")
    last_failing[owner] = inside  # increasing: each outage's last failing run wins
    target, path = target[order], path[order]
    path_names, target_names = paths.to_numpy(dtype=object), targets.to_numpy(dtype=object)  # no Index lookups
    # each outage's fields a column at a time (a year holds thousands), then its row
    begun, closed = a[lead], by_close[end_part]
    end = np.empty(len(lead), dtype="int64")
    end[closed] = first[b[end_part][closed]]
    end[~closed] = last[last_failing[~closed]] + interval[begun[~closed]]  # ns as float, truncated as int() does
    who = target_names[target[begun]].tolist()
    share = (fails / np.maximum(span, 1)).tolist()
    columns = zip(
        path_names[path[begun]].tolist(),
        who,
        pd.to_datetime(first[begun], unit="ns", utc=True).tolist(),
        pd.to_datetime(end, unit="ns", utc=True).tolist(),
        merged_verdicts.tolist(),
        rules,
        fails.tolist(),
        ongoing[end_part].tolist(),
        share,
        strict=True,
    )
    rows = [
        {
            "path": p,
            "target": t,
            "start": start,
            "end": stop,
            "verdict": verdict,
            "targets": (t,),
            "rules": rule,
            "rounds": count,
            "ongoing": still,
            "failed_share": round(part, 3),
        }
        for p, t, start, stop, verdict, rule, count, still, part in columns
    ]  # by pair, then start
    return _frame(rows)


def _by_pair_then_time(pair: np.ndarray, first: np.ndarray) -> np.ndarray:
    """np.lexsort((first, pair)) in a third of its time: a stable sort by time (the runs come
    nearly in order of it), then a stable one by pair (a radix sort of small numbers)."""
    by_time = np.argsort(first, kind="stable")
    small = pair.astype(np.int16) if len(pair) and pair.max() < 2**15 else pair
    order: np.ndarray = by_time[np.argsort(small[by_time], kind="stable")]
    return order


def _members(
    a: np.ndarray, b: np.ndarray, failing: np.ndarray, runs: pd.DataFrame, order: np.ndarray, rounds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[str, ...]]]:
    """The failing runs within each outage's runs [a, b) (in `order`; the outages in order, none
    overlapping), the outage each belongs to, each outage's verdict (the one of most rounds, the
    first seen on a tie) and its rules, sorted."""
    inside, owner = _within(a, b, failing)
    frame = pd.DataFrame(
        {
            "owner": owner,
            "kind": runs["verdict"].iloc[order[inside]].to_numpy(dtype=object),
            "rule": runs["rule"].iloc[order[inside]].to_numpy(dtype=object),
            "rounds": rounds[inside],
            "seen": np.arange(len(inside)),
        }
    )
    kinds = frame.groupby(["owner", "kind"], sort=False).agg(rounds=("rounds", "sum"), seen=("seen", "min"))
    top = kinds.reset_index().sort_values(["owner", "rounds", "seen"], ascending=[True, False, True])
    top = top.drop_duplicates("owner")
    verdicts = np.empty(len(a), dtype=object)
    verdicts[top["owner"].to_numpy()] = top["kind"].to_numpy()
    rules: list[tuple[str, ...]] = [()] * len(a)
    named = frame.drop_duplicates(["owner", "rule"]).sort_values(["owner", "rule"])
    for outage, rule in zip(named["owner"].tolist(), named["rule"].tolist(), strict=True):
        rules[outage] += (rule,)
    return inside, owner, verdicts, rules


def _within(a: np.ndarray, b: np.ndarray, failing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The failing runs in the spans [a, b) (sorted, none overlapping), and the span of each:
    the spans' runs listed (a year's outages hold a few thousand of its 400,000 runs)."""
    length = b - a
    owner = np.repeat(np.arange(len(a)), length)
    at = np.repeat(a - np.cumsum(length) + length, length) + np.arange(len(owner))
    mine = failing[at]
    return at[mine], owner[mine]


def _intervals(pair: np.ndarray, first: np.ndarray, last: np.ndarray, rounds: np.ndarray) -> np.ndarray:
    """`_interval_ns` of each run's pair (pairs numbered 0, 1, ... in order), per run."""
    bounds = np.searchsorted(pair, np.arange(pair[-1] + 2))
    per = [_interval_ns(first[x:y], last[x:y], rounds[x:y]) for x, y in zip(bounds[:-1], bounds[1:], strict=True)]
    result: np.ndarray = np.array(per, dtype="float64")[pair]
    return result


def path_outages(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per path: the union of its (target, path) outages, with the targets they affected.
    Outages join while each starts before the latest end so far (in the order of their start)."""
    if pairs.empty:
        return _frame([])
    ordered = pairs.sort_values("start")
    rows: list[dict[str, Any]] = []
    for path, group in ordered.groupby("path", sort=True):
        start, end = as_ns(group["start"]), as_ns(group["end"])
        joins = np.zeros(len(group), dtype=bool)
        joins[1:] = start[1:] <= np.maximum.accumulate(end)[:-1]
        records = _records(group)
        current: dict[str, Any] = {}
        for o, joined in zip(records, joins, strict=True):
            if joined:
                current["end"] = max(current["end"], o["end"])
                current["_targets"].update(o["targets"])
                current["_rules"].update(o["rules"])
                current["rounds"] += o["rounds"]
                current["_spanned"] += o["rounds"] / o["failed_share"]
                current["ongoing"] = current["ongoing"] or o["ongoing"]
                current["_minutes"][o["verdict"]] += o["minutes"]
                continue
            current = {**o, "path": path, "target": "*", "_targets": set(o["targets"]), "_rules": set(o["rules"])}
            current["_minutes"] = Counter({o["verdict"]: o["minutes"]})  # which verdict held longest
            current["_spanned"] = o["rounds"] / o["failed_share"]  # the rounds of its targets' outages
            rows.append(current)  # and grown in place while the next ones overlap it
    for row in rows:
        row["verdict"] = row.pop("_minutes").most_common(1)[0][0]
        row["failed_share"] = round(row["rounds"] / row.pop("_spanned"), 3)
        row["targets"], row["rules"] = tuple(sorted(row.pop("_targets"))), tuple(sorted(row.pop("_rules")))
    return _frame(rows)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """`frame.to_dict("records")` (Python values: times as Timestamps, numbers as int and
    float), a column at a time rather than a cell at a time."""
    columns = [str(c) for c in frame.columns]
    values = [frame[c].tolist() for c in frame.columns]
    return [dict(zip(columns, row, strict=True)) for row in zip(*values, strict=True)]


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
