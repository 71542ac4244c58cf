"""Each page's facts as plain data (strings, numbers, lists): the HTML templates show them
and `?format=json` serves them as they are, so the two never disagree.

The work is the analysis commands' own: `analyse_config` (pipeline.py) for outages, the rows
`tunnelwatch outages` prints (outages_cli.py), the checks of `events check` (check_cli.py,
eventcheck.py). "Now" is the newest round the store holds, not the wall clock: a store
copied off a vantage point shows its last state.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import scipy.stats  # noqa: F401  the Events page's statistics: imported as the server starts (2 s), not by its first page

from probe.config import Config
from probe.errors import ConfigError
from probe.model import PHASES
from probe.store.alerts import open_alerts
from probe.store.file import store_error
from probe.store.spool import Spool

from ..check_cli import COLUMNS as CHECK_COLUMNS
from ..check_cli import _rows as check_rows
from ..eventcheck import check_events, outage_series
from ..events import load_events, overlapping_each
from ..eventstats import Method
from ..frames import (
    MEASUREMENT_DTYPES,
    Source,
    Store,
    _frame,
    _query,
    _where,
    load_heartbeats,
    load_measurements,
)
from ..outages_cli import COLUMNS as OUTAGE_COLUMNS
from ..outages_cli import duration
from ..pipeline import Analysis, analyse_config, source
from ..ranges import Held
from ..verdicts import DEGRADED, LOCAL_OUTAGE, TUNNEL_DOWN

DOWN_VERDICTS = (TUNNEL_DOWN, LOCAL_OUTAGE)  # the path itself is down, not some sites through it
NOW_WINDOW = pd.Timedelta(days=1)  # the Now page's outages: those open in the day before the newest round
HISTORY_DAYS, OUTAGE_DAYS = 7, 30  # the History and Outages pages' default ranges, before the newest round
# `events check`'s defaults (check_cli.py METHOD_OPTIONS), in days
EVENT_METHOD = Method(baseline=28, gap=7, shifts=(-3, 14), placebo_gap=30, two_sided=False)
PHASE_COLUMNS = [f"{phase}_ms" for phase in (*PHASES, "total")]
ROUND_DTYPES = {**MEASUREMENT_DTYPES, **dict.fromkeys(PHASE_COLUMNS, "float64")}


_AS_IS = (str, int, bool)


def jsonable(value: Any) -> Any:
    """A value as JSON holds it: times in ISO 8601, tuples as lists, NaN and NA as null."""
    if value is None or type(value) in _AS_IS:  # most cells: a year's outage rows hold 10,000
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, (pd.Timestamp, datetime)):
        return value.isoformat()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def facts(page: dict[str, Any]) -> dict[str, Any]:
    return cast(dict[str, Any], jsonable(page))


# a page's analysis may use a summary of the raw rows after the cursor this old: a live store
# has a new round every few seconds (ranges.Held)
TAIL_LAG_S = 20.0
_HELD: dict[Store, Held] = {}
_HELD_LOCK = threading.Lock()


def held(cfg: Config) -> Held:
    """The summaries of the store the pages read, kept in memory for this process: a page over
    any range cuts them rather than reading the store again (ranges.Held), with the raw rows
    after their cursor summarised at most TAIL_LAG_S ago."""
    db = source(cfg)
    with _HELD_LOCK:
        return _HELD.setdefault(db, Held(db, TAIL_LAG_S))


def newest(cfg: Config) -> pd.Timestamp | None:
    """When the newest round stored started (the heartbeats' time index)."""
    db = source(cfg)
    where, args = _where(db, None, None, {})
    rows = _query(db, f"SELECT MAX(started_at_ms) FROM heartbeats{where}", args)
    return None if not rows or rows[0][0] is None else pd.Timestamp(rows[0][0], unit="ms", tz="UTC")


def cycle(cfg: Config) -> pd.Timedelta:
    return pd.Timedelta(seconds=max([cfg.probe.interval_s, *cfg.probe.group_intervals_s.values()]))


def now_page(cfg: Config) -> dict[str, Any]:
    """Each path's state (up, degraded, down) with its open outage, each pair's newest result,
    the last heartbeat and the open alerts."""
    last = newest(cfg)
    if last is None:
        return {"store": str(source(cfg)), "newest": None, "paths": [], "targets": [], "alerts": []}
    db = source(cfg)
    window = 2 * cycle(cfg)
    recent = load_measurements(db, (last - window).to_pydatetime())
    pairs = recent.sort_values("started_at").groupby(["target", "path"], observed=True).tail(1)
    beats = load_heartbeats(db, (last - window).to_pydatetime())
    beat = beats.sort_values("finished_at").iloc[-1] if len(beats) else None
    since = last - NOW_WINDOW
    result = analyse_config(cfg, since.to_pydatetime(), None, held=held(cfg))
    cards = []
    for path in sorted(set(pairs["path"].astype(str))):
        mine = pairs[pairs["path"] == path]
        outages = result.paths[result.paths["path"] == path].sort_values("start")
        ongoing = outages[outages["ongoing"].astype(bool)]
        card: dict[str, Any] = {"path": path, "ok": int(mine["ok"].sum()), "targets": len(mine)}
        card["last_round"] = mine["started_at"].max()
        if len(ongoing):
            open_one = ongoing.iloc[-1]
            down = any(v in DOWN_VERDICTS for v in ongoing["verdict"])
            card |= {
                "state": "down" if down else "degraded",
                "since": ongoing["start"].min(),
                "verdict": str(open_one["verdict"]),
                "rules": list(open_one["rules"]),
                "affected": list(open_one["targets"]),
            }
        else:
            ended = outages[outages["verdict"] != DEGRADED]["end"]
            first = result.span[0] if result.span else since  # up since the first round, if it is that recent
            card |= {"state": "up", "since": ended.max() if len(ended) else (first if first > since else None)}
            card["since_at_least"] = since
        cards.append(card)
    targets: dict[str, dict[str, Any]] = {}
    for row in pairs.sort_values(["group", "target", "path"]).to_dict("records"):
        entry = targets.setdefault(str(row["target"]), {"target": row["target"], "group": row["group"], "paths": {}})
        entry["paths"][str(row["path"])] = {
            "ok": bool(row["ok"]),
            "failure": row["failure"],
            "operation": row["failed_operation"],
            "at": row["started_at"],
        }
    return facts(
        {
            "store": str(db),
            "newest": last,
            "heartbeat": None
            if beat is None
            else {
                "round_id": beat["round_id"],
                "started_at": beat["started_at"],
                "finished_at": beat["finished_at"],
                # how late the rounds of the last two cycles started against their schedule
                "late_s": _late_s(beat),
                "late_max_s": max((_late_s(b) or 0.0 for _, b in beats.iterrows()), default=None),
            },
            "backlog": backlog(cfg),
            "paths": cards,
            "path_names": sorted(set(pairs["path"].astype(str))),
            "targets": list(targets.values()),
            "alerts": open_alert_rows(db),
        }
    )


def _late_s(beat: pd.Series) -> float | None:
    scheduled = beat["scheduled_at"]
    return None if pd.isna(scheduled) else round((beat["started_at"] - scheduled).total_seconds(), 3)


def backlog(cfg: Config) -> dict[str, Any] | None:
    """In fleet mode (store.url), what the spool holds that the central store has not yet
    (`tunnelwatch status` says the same); None otherwise or when serving another store."""
    chosen = source(cfg)
    db = chosen.location if isinstance(chosen, Source) else chosen
    if cfg.store.url is None or db != cfg.store.path or not isinstance(db, Path):
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'forward_cursor'").fetchone():
                return None
            queued = Spool(conn).backlog()
    except sqlite3.Error as exc:
        raise store_error(db, exc, "read the spool's backlog") from None
    oldest = None if queued.oldest_ms is None else pd.Timestamp(queued.oldest_ms, unit="ms", tz="UTC")
    return {"measurements": queued.measurements, "oldest": oldest, "dropped": queued.dropped}


def open_alert_rows(db: Store) -> list[dict[str, Any]]:
    """The open alerts of a vantage point's store (the central store keeps none)."""
    path = db if isinstance(db, Path) else db.location
    if not isinstance(path, Path):
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'alerts'").fetchone():
                return []
            alerts = open_alerts(conn)
    except sqlite3.Error as exc:
        raise store_error(path, exc, "read the alerts") from None
    return [
        {
            "path": a.path,
            "target": a.target,
            "verdict": a.verdict,
            "since": pd.Timestamp(a.start_ms, unit="ms", tz="UTC"),
            "why": "; ".join(p for p in (",".join(a.rules), a.detail, a.failure) if p),
        }
        for a in alerts
    ]


@dataclass(frozen=True, slots=True)
class Range:
    since: pd.Timestamp
    until: pd.Timestamp


def default_range(cfg: Config, since: datetime | None, until: datetime | None, days: int) -> Range | None:
    """[since, until), the missing ends the `days` before the newest round and the hour after it."""
    last = newest(cfg)
    if last is None and (since is None or until is None):
        return None
    end = pd.Timestamp(until) if until else (last + pd.Timedelta(hours=1)).floor("1h")  # type: ignore[operator]
    start = pd.Timestamp(since) if since else end - pd.Timedelta(days=days)
    if start >= end:
        raise ConfigError(f"since {start.isoformat()} is not before until {end.isoformat()}")
    return Range(start, end)


def outage_rows(result: Analysis, events: list[Any]) -> list[dict[str, Any]]:
    """The rows `tunnelwatch outages` prints (by path), as its JSON lines hold them."""
    rows = []
    ordered = result.paths.sort_values(["start", "path"])
    hits = overlapping_each(ordered["start"], ordered["end"], events)
    for row, overlaps in zip(ordered.to_dict("records"), hits, strict=True):
        row["duration"] = duration(row["minutes"])
        row["events"] = overlaps
        rows.append({c: jsonable(row.get(c)) for c in OUTAGE_COLUMNS})
    return rows


def outages_page(cfg: Config, since: datetime | None, until: datetime | None, path: str | None) -> dict[str, Any]:
    span = default_range(cfg, since, until, OUTAGE_DAYS)
    base = {"store": str(source(cfg)), "columns": OUTAGE_COLUMNS, "path": path}
    if span is None:
        return {**base, "since": None, "until": None, "rows": []}
    paths = (path,) if path else ()
    result = analyse_config(cfg, span.since.to_pydatetime(), span.until.to_pydatetime(), held=held(cfg), paths=paths)
    rows = outage_rows(result, load_events(cfg.analysis.events))
    return facts({**base, "since": span.since, "until": span.until, "rows": rows})


def events_page(cfg: Config, since: datetime | None, until: datetime | None) -> dict[str, Any]:
    """`tunnelwatch events check` with its defaults: the outage minutes per day against the
    calendar's events (holidays left out); a message where the data is too short."""
    base: dict[str, Any] = {"store": str(source(cfg)), "columns": CHECK_COLUMNS, "rows": [], "message": None}
    result = analyse_config(cfg, since, until, held=held(cfg))
    if result.span is None:
        return {**base, "message": f"{source(cfg)}: no measurements in that range to check events against"}
    start, end = result.span
    outages = result.paths[result.paths["verdict"] != DEGRADED]
    data = outage_series(outages, result.summary.coverage, start, end)
    spanned = len(data.per_unit()[0])
    need = EVENT_METHOD.baseline + EVENT_METHOD.gap
    if spanned < need + 1:
        return {
            **base,
            "message": f"{source(cfg)}: the data spans {spanned} {data.units}; the baseline alone needs {need} "
            "before a window (events check --baseline and --gap)",
        }
    every = load_events(cfg.analysis.events)
    chosen = [e for e in every if e.category != "holiday" and e.window[0] < end and start < e.window[1]]
    if not chosen:
        return {**base, "message": f"no event falls within the data ({start:%Y-%m-%d} to {end:%Y-%m-%d})"}
    try:
        checks = check_events(
            data, chosen, every, first_outages=outages["start"] if len(outages) else None, method=EVENT_METHOD
        )
    except ValueError as exc:
        raise ConfigError(f"{source(cfg)}: {exc}") from None
    return facts({**base, "since": start, "until": end, "rows": check_rows(checks, False)})


def round_page(cfg: Config, since: datetime, path: str | None) -> dict[str, Any]:
    """The raw measurements of the slot (probe.interval_s) that starts at `since`: every
    target's round in it, each with its phase times and failure; `path` is the one asked about."""
    db = source(cfg)
    start = pd.Timestamp(since).floor("1s")  # an outage starts at its first probe's time, a slot's on a second
    end = start + pd.Timedelta(seconds=cfg.probe.interval_s)
    where, args = _where(db, start.to_pydatetime(), end.to_pydatetime(), {})
    rows = _frame(db, "measurements", ROUND_DTYPES, where, args).rename(columns={"grp": "group"})
    columns = ["started_at", "round_id", "target", "path", "ok", "failure", "failed_operation"]
    columns += [*PHASE_COLUMNS, "status", "addresses", "title"]
    records = rows.sort_values(["started_at", "target", "path"])[columns].to_dict("records")
    for record in records:
        record["addresses"] = json.loads(record["addresses"] or "[]")  # stored as JSON text
    return facts(
        {
            "store": str(db),
            "since": start,
            "until": end,
            "path": path,
            "columns": columns,
            "rows": records,
            "raw_kept_days": cfg.store.keep_raw_days,
        }
    )


def reports_page(cfg: Config) -> dict[str, Any]:
    """The weekly reports in report.directory, newest first."""
    return {
        "directory": str(cfg.report.directory),
        "reports": [
            {"name": p.name, "week": p.stem.removeprefix("tunnelwatch-"), "bytes": p.stat().st_size}
            for p in report_files(cfg)
        ],
    }


def report_files(cfg: Config) -> list[Path]:
    directory = cfg.report.directory
    if not directory.is_dir():
        return []
    return sorted(directory.glob("tunnelwatch-*-W*.*"), key=lambda p: (p.stem, p.suffix), reverse=True)
