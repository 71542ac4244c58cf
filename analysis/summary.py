"""Summaries: everything the analysis asks of a time range, at a small fraction of the raw size.

A Summary holds
- `runs`: per (target, path), runs of consecutive rounds with the same verdict (state,
  verdict, rule, blocking type, detail), with the first and last round's time and the
  count; a run also ends where the rounds pause, so gaps stay visible;
- `hourly`: per (hour, group, path), probes and failing probes;
- `latency`: per (hour, path), percentiles of connect, first-byte and total times of the
  probes that worked;
- `coverage`: spans of time the daemon was measuring (heartbeats no further apart than
  2.5 intervals), each ending one interval after its last heartbeat.

`summarise` makes one from raw rows, `join` puts two consecutive ones together. Pure: no
I/O here. The store keeps the summaries of everything before its cursor (compaction.py
writes them, the daemon compacts every hour), so a command reads those plus the raw rows
after the cursor, summarised the same way (ranges.py): one implementation whatever the age.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from probe.store.schema import LATENCY_METRICS, LATENCY_PERCENTILES, LATENCY_VALUES, VERDICT_COLUMNS

from .verdicts import FAILING, classify

# The frames' columns: the summary tables' (probe/store/schema.py), times under their names.
RUN_KEY = list(VERDICT_COLUMNS)
RUN_COLUMNS = ["target", "path", *RUN_KEY, "first", "last", "rounds"]
HOURLY_COLUMNS = ["hour", "group", "path", "probes", "failing"]
QUANTILES = tuple(p / 100 for p in LATENCY_PERCENTILES)
LATENCY_COLUMNS = ["hour", "path", "samples", *LATENCY_VALUES]
COVERAGE_COLUMNS = ["start", "end"]
RUN_BREAK = 1.5  # a pause longer than this many of the pair's usual steps ends a run
GAP_INTERVALS = 2.5  # heartbeats further apart than this many intervals: the daemon was not measuring
HOUR = pd.Timedelta(hours=1)
LAG_LIMIT_MS = 10.0  # probe/measure/lag.py: above this, a measurement's timings are not trusted


def as_ns(times: pd.Series) -> np.ndarray:
    """UTC times as int64 nanoseconds, whatever the unit they are stored in."""
    return times.astype("datetime64[ns, UTC]").astype("int64").to_numpy()


def _empty(columns: list[str], times: tuple[str, ...]) -> pd.DataFrame:
    return _empty_kept(tuple(columns), times).copy()


@functools.cache
def _empty_kept(columns: tuple[str, ...], times: tuple[str, ...]) -> pd.DataFrame:
    # built once: a DataFrame of typed empty Series costs milliseconds, and an analysis asks often
    return pd.DataFrame({c: pd.Series(dtype="datetime64[ns, UTC]" if c in times else "object") for c in columns})


@dataclass(frozen=True, slots=True)
class Summary:
    runs: pd.DataFrame
    hourly: pd.DataFrame
    latency: pd.DataFrame
    coverage: pd.DataFrame

    @classmethod
    def empty(cls) -> Summary:
        return cls(
            _empty(RUN_COLUMNS, ("first", "last")),
            _empty(HOURLY_COLUMNS, ("hour",)),
            _empty(LATENCY_COLUMNS, ("hour",)),
            _empty(COVERAGE_COLUMNS, ("start", "end")),
        )

    @property
    def span(self) -> tuple[pd.Timestamp, pd.Timestamp] | None:
        if self.coverage.empty:
            return None
        return self.coverage["start"].min(), self.coverage["end"].max()

    def gaps(self, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
        """Time in [start, end) the daemon was not measuring."""
        edges = [start]
        for a, b in zip(self.coverage["start"], self.coverage["end"], strict=True):
            if b > start and a < end:
                edges += [max(a, start), min(b, end)]
        edges.append(end)
        pairs = [(a, b) for a, b in zip(edges[::2], edges[1::2], strict=True) if b > a]
        return pd.DataFrame(pairs, columns=COVERAGE_COLUMNS)

    def only(self, targets: tuple[str, ...] = (), paths: tuple[str, ...] = ()) -> Summary:
        def keep(frame: pd.DataFrame, column: str, values: tuple[str, ...]) -> pd.DataFrame:
            return frame[frame[column].isin(values)] if values and column in frame else frame

        return Summary(
            keep(keep(self.runs, "target", targets), "path", paths),
            keep(self.hourly, "path", paths),
            keep(self.latency, "path", paths),
            self.coverage,
        )

    def clip(self, start: pd.Timestamp, end: pd.Timestamp) -> Summary:
        """The part in [start, end): runs cut to the rounds inside, hours that start inside."""

        def hours(frame: pd.DataFrame) -> pd.DataFrame:
            return frame[(frame["hour"] >= start) & (frame["hour"] < end)]

        coverage = self.coverage[(self.coverage["end"] > start) & (self.coverage["start"] < end)]
        coverage = coverage.assign(
            start=coverage["start"].mask(coverage["start"] < start, start),
            end=coverage["end"].mask(coverage["end"] > end, end),
        )
        return Summary(clip_runs(self.runs, start, end), hours(self.hourly), hours(self.latency), coverage)


def clip_runs(runs: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """Runs cut to their rounds in [start, end). Rounds inside a run are evenly spaced."""
    reach = (runs["last"] >= start) & (runs["first"] < end)
    if not reach.all():  # a year's runs are 10 columns of 400,000 rows: taken only when some go
        runs = runs[reach]
    if runs.empty:
        return runs
    first, last = as_ns(runs["first"]), as_ns(runs["last"])
    rounds = runs["rounds"].to_numpy(dtype="int64")
    step = np.where(rounds > 1, (last - first) / np.maximum(rounds - 1, 1), 1.0)
    # no run starts before its first round: an open start (Timestamp.min) is that, and
    # Timestamp.min - first overflowed int64 (every run was cut away)
    lo = max(start.value, int(first.min()))
    skip = np.clip(np.ceil((lo - first) / step), 0, None).astype("int64")
    keep_to = np.clip(np.ceil((end.value - first) / step) - 1, None, rounds - 1).astype("int64")
    out = runs.copy(deep=False)  # copy on write: the new columns are this frame's alone
    out["first"] = pd.to_datetime(first + np.round(skip * step).astype("int64"), unit="ns", utc=True)
    out["last"] = pd.to_datetime(first + np.round(keep_to * step).astype("int64"), unit="ns", utc=True)
    out["rounds"] = keep_to - skip + 1
    kept = out["rounds"] > 0
    return out if kept.all() else out[kept]


def verdict_runs(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Consecutive rounds of a (target, path) with the same verdict, as one row each."""
    if verdicts.empty:
        return Summary.empty().runs
    v = verdicts.sort_values(["target", "path", "started_at"]).reset_index(drop=True)
    key = v[RUN_KEY].astype(object).fillna("").astype(str)
    pair = v["target"].astype(str) + "\0" + v["path"].astype(str)
    new_pair = (pair != pair.shift()).to_numpy()
    step = v["started_at"].diff().dt.total_seconds().to_numpy(copy=True)
    step[new_pair] = np.nan
    usual = pd.Series(step).groupby(pair.to_numpy()).transform("median").to_numpy()
    paused = step > RUN_BREAK * usual
    changed = (key != key.shift()).any(axis=1).to_numpy()
    run = np.cumsum(new_pair | changed | paused)
    grouped = v.assign(**key, run=run).groupby("run", sort=False)
    out = grouped[["target", "path", *RUN_KEY]].first().astype({"target": str, "path": str})
    out["first"] = grouped["started_at"].min()
    out["last"] = grouped["started_at"].max()
    out["rounds"] = grouped.size()
    return out[RUN_COLUMNS].reset_index(drop=True)


def hourly_counts(verdicts: pd.DataFrame) -> pd.DataFrame:
    if verdicts.empty:
        return Summary.empty().hourly
    frame = verdicts.assign(hour=verdicts["started_at"].dt.floor(HOUR), failing=verdicts["state"] == FAILING)
    grouped = frame.groupby(["hour", "group", "path"], observed=True)["failing"]
    out = grouped.agg(probes="size", failing="sum").reset_index()
    out["group"], out["path"] = out["group"].astype(str), out["path"].astype(str)
    return out[HOURLY_COLUMNS]


def hourly_latency(measurements: pd.DataFrame, window: str = "1h") -> pd.DataFrame:
    """Percentiles per (hour, path) of the probes that worked (endpoint probes left out).
    The phases are timed by the kernel (probe/measure/conn.py), the total by the event loop: the
    total of a probe that ran while the loop was over LAG_LIMIT_MS late is left out.
    Another `window` (a lab run of minutes) gives the same frame per window."""
    ok = measurements[measurements["ok"] & (measurements["group"] != "endpoint")]
    if "loop_lag_ms" in ok:
        ok = ok.assign(total_ms=ok["total_ms"].where(~(ok["loop_lag_ms"] > LAG_LIMIT_MS)))
    if ok.empty:
        return Summary.empty().latency
    grouped = ok.groupby([ok["started_at"].dt.floor(window).rename("hour"), ok["path"].astype(str)], observed=True)
    parts: list[pd.Series | pd.DataFrame] = [grouped.size().rename("samples")]
    for metric in LATENCY_METRICS:  # total: the whole fetch, where throttling shows
        q = grouped[f"{metric}_ms"].quantile(np.array(QUANTILES)).unstack()
        q.columns = [f"{metric}_p{p}" for p in LATENCY_PERCENTILES]  # unstack gives them in order
        parts.append(q)
    return pd.concat(parts, axis=1).reset_index()[LATENCY_COLUMNS]


def coverage_spans(heartbeats: pd.DataFrame, interval_s: float) -> pd.DataFrame:
    if heartbeats.empty:
        return Summary.empty().coverage
    times = heartbeats["started_at"].sort_values().reset_index(drop=True)
    interval = pd.Timedelta(seconds=interval_s)
    span = (times.diff() > GAP_INTERVALS * interval).cumsum()
    grouped = times.groupby(span)
    return pd.DataFrame({"start": grouped.min(), "end": grouped.max() + interval}).reset_index(drop=True)


def summarise(measurements: pd.DataFrame, heartbeats: pd.DataFrame, paths: pd.DataFrame, slot_s: float) -> Summary:
    verdicts = classify(measurements, paths, slot_s)
    return Summary(
        verdict_runs(verdicts),
        hourly_counts(verdicts),
        hourly_latency(measurements),
        coverage_spans(heartbeats, slot_s),
    )


def join(old: Summary, new: Summary) -> Summary:
    """`new` follows `old` in time: runs and coverage spans that meet are merged, and an hour
    both hold (a round that straddled the cursor) is added up."""
    return Summary(
        merge_runs(old.runs, new.runs),
        _add_hours(old.hourly, new.hourly),
        _add_latency(old.latency, new.latency),
        merge_coverage(old.coverage, new.coverage),
    )


def _add_hours(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    if a.empty or b.empty:
        return b if a.empty else a
    both = pd.concat([a, b], ignore_index=True)
    return both.groupby(["hour", "group", "path"], as_index=False)[["probes", "failing"]].sum()[HOURLY_COLUMNS]


def _add_latency(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Percentiles of an hour seen in two parts: their mean weighted by samples (the parts
    are a straddling round and the rest of the hour, so this is close)."""
    if a.empty or b.empty:
        return b if a.empty else a
    both = pd.concat([a, b], ignore_index=True)
    values = list(LATENCY_VALUES)
    weighted = (
        both[values].mul(both["samples"], axis=0).assign(hour=both["hour"], path=both["path"], samples=both["samples"])
    )
    sums = weighted.groupby(["hour", "path"], as_index=False).sum(min_count=1)
    sums[values] = sums[values].div(sums["samples"], axis=0)
    return sums[LATENCY_COLUMNS]


def merge_runs(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Each pair's first new run continues its last old run when their verdicts are the same
    and the pause between them is one usual step."""
    if old.empty or new.empty:
        return new if old.empty else old
    # the runs that end earlier are left out before sorting (a year holds 400,000)
    last = (
        old[old["last"] >= merge_reach(old, new)].sort_values("last").groupby(["target", "path"], observed=True).tail(1)
    )
    first = new.sort_values("first").groupby(["target", "path"], observed=True).head(1)
    both = last.reset_index().merge(first.reset_index(), on=["target", "path", *RUN_KEY], suffixes=("_old", "_new"))
    if both.empty:
        return pd.concat([old, new], ignore_index=True)
    step = _steps(both)
    pause = (both["first_new"] - both["last_old"]).dt.total_seconds().to_numpy()
    joined = both[(pause > 0) & (pause <= RUN_BREAK * step)]
    old, new = old.copy(deep=False), new.copy(deep=False)  # copy on write: the changed columns are copied
    old.loc[joined["index_old"], "last"] = joined["last_new"].to_numpy()
    old.loc[joined["index_old"], "rounds"] = (joined["rounds_old"] + joined["rounds_new"]).to_numpy()
    return pd.concat([old, new.drop(joined["index_new"])], ignore_index=True)


def merge_reach(old: pd.DataFrame, new: pd.DataFrame) -> pd.Timestamp:
    """How early an old run may end and still be continued by a new one (`merge_runs`): within
    the longest step of either side before the first new run (1 s to spare). Both not empty."""
    longest = max(_longest_step(old), _longest_step(new))
    return pd.Timestamp(int(as_ns(new["first"]).min() - RUN_BREAK * longest - 1e9), tz="UTC")


def _longest_step(runs: pd.DataFrame) -> float:
    """The longest step between the rounds of a run, in ns (0 if every run is one round)."""
    rounds = runs["rounds"].to_numpy(dtype=float)
    span = as_ns(runs["last"]) - as_ns(runs["first"])
    return float(np.max(span / np.maximum(rounds - 1, 1), initial=0.0))


def _steps(both: pd.DataFrame) -> np.ndarray:
    """The usual step between rounds, from whichever side has more than one round."""

    def step(suffix: str) -> np.ndarray:
        rounds = both[f"rounds{suffix}"].to_numpy(dtype=float)
        span = (both[f"last{suffix}"] - both[f"first{suffix}"]).dt.total_seconds().to_numpy()
        return np.where(rounds > 1, span / np.maximum(rounds - 1, 1), np.nan)

    steps: np.ndarray = np.fmax(step("_old"), step("_new"))
    return steps


def merge_coverage(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    if old.empty or new.empty:
        return new if old.empty else old
    spans = pd.concat([old, new], ignore_index=True)
    return pd.DataFrame(union(zip(spans["start"], spans["end"], strict=True)), columns=COVERAGE_COLUMNS)


def union(spans: Iterable[tuple[pd.Timestamp, pd.Timestamp]]) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """[start, end) spans merged where they overlap or touch, in order: time covered by
    several counts once."""
    merged: list[tuple[pd.Timestamp, pd.Timestamp]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
