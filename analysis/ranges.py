"""A range's summary: the stored summaries before the store's cursor joined to the raw rows
after it, summarised alike (`load_summary`, what the analysis commands use), read from the
store, or cut from a copy a long-lived reader holds in memory (`Held`: the dashboard's
`tunnelwatch serve` answers many ranges from one reading).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd

from probe.errors import TunnelwatchError
from probe.store.schema import COVERAGE, HOURLY, HOURLY_LATENCY, VERDICT_RUNS, to_ms

from .frames import HOUR_MS, ROUND_SPAN, Store, _query, _rows, _where, load_paths, read_cursor, summarise_raw
from .summary import Summary, join, merge_reach

log = logging.getLogger("tunnelwatch.serve")


def load_summary(
    db: Store, since: datetime | None, until: datetime | None, slot_s: float, held: Held | None = None
) -> Summary:
    """Everything analysis needs of [since, until): stored summaries before the cursor, raw
    rows after it. With `held`, the stored summaries are those it keeps in memory (the same
    rows, read once by a process that answers many ranges), and so is the raw rows' summary
    when the range runs from the cursor past the newest of them (Held.tail), and the two
    joined (Held.whole)."""
    start = None if since is None else pd.Timestamp(since)
    end = None if until is None else pd.Timestamp(until)
    return _clipped(_joined(db, start, end, slot_s, held), start, end)


def load_range(
    db: Store, since: datetime | None, until: datetime | None, before: pd.Timedelta, slot_s: float, held: Held | None
) -> tuple[Summary, pd.DataFrame]:
    """`load_summary` of [since, until), and the latency of [since - before, until) (what
    degradation is judged against): one reading, the runs clipped once."""
    start = None if since is None else pd.Timestamp(since)
    end = None if until is None else pd.Timestamp(until)
    lo = None if start is None else start - before
    joined = _joined(db, lo, end, slot_s, held)
    latency = joined.latency
    if lo is not None:
        latency = latency[latency["hour"] >= lo]
    if end is not None:
        latency = latency[latency["hour"] < end]
    return _clipped(joined, start, end), _plain(latency, Summary.empty().latency)


def _joined(
    db: Store, start: pd.Timestamp | None, end: pd.Timestamp | None, slot_s: float, held: Held | None
) -> Summary:
    """The summary of [start, end) joined from the store's parts, not yet clipped to it."""
    cursor = read_cursor(db) if held is None else held.refresh()  # says so if there is no store
    whole = None if held is None or cursor is None else held.whole(cursor, start, end, slot_s)
    if whole is not None:
        return whole
    stored = Summary.empty()
    if cursor is not None and (start is None or start < cursor):
        hi = cursor if end is None else min(end, cursor)
        stored = _stored(db, start, hi) if held is None else held.stored(start, hi)
    tail_from = start if cursor is None or (start is not None and start > cursor) else cursor
    tail = None if held is None or tail_from is None or tail_from != cursor else held.tail(tail_from, end, slot_s)
    return join(stored, summarise_raw(db, tail_from, end, slot_s) if tail is None else tail)


def _clipped(summary: Summary, start: pd.Timestamp | None, end: pd.Timestamp | None) -> Summary:
    """The part of `summary` in [start, end), its frames numbered from 0 and an empty one
    `Summary.empty()`'s, whatever it was cut from."""
    if start is not None or end is not None:
        summary = summary.clip(start or pd.Timestamp.min.tz_localize("UTC"), end or pd.Timestamp.max.tz_localize("UTC"))
    empty = Summary.empty()
    return Summary(
        _plain(summary.runs, empty.runs),
        _plain(summary.hourly, empty.hourly),
        _plain(summary.latency, empty.latency),
        _plain(summary.coverage, empty.coverage),
    )


def _stored(db: Store, start: pd.Timestamp | None, end: pd.Timestamp) -> Summary:
    """The stored summaries of [start, end): the runs and coverage spans that reach into it,
    the hours from the one `start` is in."""
    lo = to_ms(start.to_pydatetime()) if start is not None else -(2**62)
    hi = to_ms(end.to_pydatetime())
    hour_lo = lo - lo % HOUR_MS
    empty = Summary.empty()
    return Summary(
        _rows(db, VERDICT_RUNS, "last_ms >= ? AND first_ms < ?", (lo, hi), empty.runs, "first_ms"),
        _rows(db, HOURLY, "hour_ms >= ? AND hour_ms < ?", (hour_lo, hi), empty.hourly),
        _rows(db, HOURLY_LATENCY, "hour_ms >= ? AND hour_ms < ?", (hour_lo, hi), empty.latency),
        _rows(db, COVERAGE, "end_ms > ? AND start_ms < ?", (lo, hi), empty.coverage, "start_ms"),
    )


REREAD_MS = 86_400_000  # what a held copy reads again when the cursor moves: from a day before it


def _raw_state(db: Store, after: pd.Timestamp) -> tuple[int, int | None, int, int | None]:
    """How many raw rows `summarise_raw(db, after, None, ...)` reads, and the newest's start:
    the measurements from a round's span before `after` (as it reads them), the heartbeats from
    `after`. Rows after the cursor are only ever added, so an unchanged count is unchanged rows."""
    measured, measured_args = _where(db, (after - ROUND_SPAN).to_pydatetime(), None, {})
    beaten, beaten_args = _where(db, after.to_pydatetime(), None, {})
    rows = _query(
        db,
        f"SELECT (SELECT COUNT(*) FROM measurements{measured}), (SELECT MAX(started_at_ms) FROM measurements{measured}),"
        f" (SELECT COUNT(*) FROM heartbeats{beaten}), (SELECT MAX(started_at_ms) FROM heartbeats{beaten})",
        [*measured_args, *measured_args, *beaten_args, *beaten_args],
    )
    count, newest, beats, newest_beat = rows[0]
    return count, newest, beats, newest_beat


@dataclass(frozen=True, slots=True)
class _Tail:
    state: tuple[Any, ...]  # (cursor, slot_s, _raw_state's four, the paths' rows)
    summary: Summary
    made: float  # time.monotonic()


SETTLE_S = 0.2  # a catch-up waits this long, then while pages are being made (Held.making), at most YIELD_S
YIELD_S = 10.0


class Held:
    """A store's stored summaries, all of them, kept in memory by a long-lived reader (the
    dashboard): any range is then cut from memory rather than read again. `refresh` follows
    the store: when its cursor moves, the rows compaction may have written or changed since
    (runs that end, hours that start, from a day before the old cursor on; every coverage
    span) are read again, runs by their id. `stored(start, end)` holds what `_stored` reads
    of the same range; `tail` the raw rows after the cursor summarised (every page asked for
    that summary again: 0.16-0.21 s for the hour or two a live store holds).

    A running daemon stores a target's round every few seconds (each target's rounds are
    spread over the interval), so the raw rows are seldom the same for two pages. With
    `lag_s`, a summary of them younger than that is used though rounds came in since (the
    same cursor, the same paths), and made again in the background, between pages (`making`):
    a page may then lag the store by `lag_s`, as a kept page does (web/cache.py). `version`
    counts the summaries of the raw rows made, so a page made from one that lagged is known
    to be behind once it is caught up (cache.Pages.state). With none (the default), every
    analysis is that of the store as it is."""

    def __init__(self, db: Store, lag_s: float = 0.0) -> None:
        self.db = db
        self.lag_s = lag_s
        self.cursor: pd.Timestamp | None = None
        self._lock = threading.Lock()
        empty = Summary.empty()
        self._runs = empty.runs.assign(id=pd.Series(dtype="int64"))
        self._hourly, self._latency, self._coverage = empty.hourly, empty.latency, empty.coverage
        self._tail: _Tail | None = None
        self._tail_lock = threading.Lock()  # one page summarises the tail; one arriving meanwhile waits for it
        self._catching_up: threading.Thread | None = None
        self._whole: tuple[_Tail, pd.Timestamp, Summary, pd.Timestamp] | None = None  # whole(): per tail
        self._whole_lock = threading.Lock()
        self._making = 0  # pages being made (Held.making): a catch-up waits for none
        self._making_lock = threading.Lock()
        self.version = 0  # summaries of the raw rows made so far

    def refresh(self) -> pd.Timestamp | None:
        """The store's cursor, with the summaries before it in memory."""
        with self._lock:
            cursor = read_cursor(self.db)
            if cursor is None or cursor == self.cursor:
                self.cursor = cursor
                return cursor
            whole = self.cursor is None or cursor < self.cursor
            since = -(2**62) if self.cursor is None or whole else to_ms(self.cursor.to_pydatetime()) - REREAD_MS
            hour = since - since % HOUR_MS
            empty = Summary.empty()
            runs = _rows(self.db, VERDICT_RUNS, "last_ms >= ?", (since,), self._runs.iloc[:0], "first_ms", True)
            hourly = _rows(self.db, HOURLY, "hour_ms >= ?", (hour,), empty.hourly)
            latency = _rows(self.db, HOURLY_LATENCY, "hour_ms >= ?", (hour,), empty.latency)
            coverage = _rows(self.db, COVERAGE, "start_ms IS NOT NULL", (), empty.coverage, "start_ms")
            if not whole:
                cut = pd.Timestamp(since, unit="ms", tz="UTC")
                kept = self._runs[(self._runs["last"] < cut) & ~self._runs["id"].isin(runs["id"])]
                runs = pd.concat([kept, runs], ignore_index=True).sort_values("first", kind="stable")
                start = pd.Timestamp(hour, unit="ms", tz="UTC")
                hourly = _stack(self._hourly[self._hourly["hour"] < start], hourly)
                latency = _stack(self._latency[self._latency["hour"] < start], latency)
            self._runs, self._hourly, self._latency, self._coverage = runs, hourly, latency, coverage
            self.cursor = cursor
        with self._whole_lock:
            self._whole = None  # joined to the summaries of another cursor: not kept twice
        return cursor

    def stored(self, start: pd.Timestamp | None, end: pd.Timestamp) -> Summary:
        """`_stored(db, start, end)` from memory: `end` at most the cursor `refresh` gave."""
        with self._lock:
            runs, hourly, latency, coverage = self._runs, self._hourly, self._latency, self._coverage
        lo = pd.Timestamp.min.tz_localize("UTC") if start is None else start
        hour_lo = (
            lo if start is None else pd.Timestamp(to_ms(lo.to_pydatetime()) // HOUR_MS * HOUR_MS, unit="ms", tz="UTC")
        )
        empty = Summary.empty()
        runs = runs[(runs["last"] >= lo) & (runs["first"] < end)]
        return Summary(
            _plain(runs.drop(columns="id"), empty.runs),
            _plain(hourly[(hourly["hour"] >= hour_lo) & (hourly["hour"] < end)], empty.hourly),
            _plain(latency[(latency["hour"] >= hour_lo) & (latency["hour"] < end)], empty.latency),
            _plain(coverage[(coverage["end"] > lo) & (coverage["start"] < end)], empty.coverage),
        )

    def tail(self, cursor: pd.Timestamp, end: pd.Timestamp | None, slot_s: float) -> Summary | None:
        """`summarise_raw(db, cursor, end, slot_s)`: the raw rows after the cursor summarised
        once while they stay the same (the same count, the same paths), for every range that
        ends after the newest of them (or one younger than `lag_s`, caught up in the
        background). None for a range that ends among them (its last rounds are cut there:
        the store's rows up to its end are summarised) or when rows came in while they were
        summarised."""
        kept = self._kept_tail(cursor, end, slot_s)
        return None if kept is None else _own(kept.summary)

    def whole(
        self, cursor: pd.Timestamp, start: pd.Timestamp | None, end: pd.Timestamp | None, slot_s: float
    ) -> Summary | None:
        """`join(stored(None, cursor), tail(cursor, end, slot_s))`, the whole store's summary,
        joined once per summary of the raw rows (joining a year's 384,151 runs and 70,000
        hours took 0.06 s a page) for ranges that run past the newest raw row. A range cut
        from it is the one `load_summary` makes without it if it starts before the cursor by
        more than the longest step of a run (`merge_reach`: no run it leaves out could have
        been continued after the cursor); None for any other range."""
        if (start is not None and start >= cursor) or (end is not None and end <= cursor):
            return None  # no raw row in the range, or no stored summary
        kept = self._kept_tail(cursor, end, slot_s)
        if kept is None:
            return None
        whole, reach = self._joined(kept, cursor)
        return None if start is not None and start >= reach else _own(whole)

    def _joined(self, kept: _Tail, cursor: pd.Timestamp) -> tuple[Summary, pd.Timestamp]:
        """The stored summaries joined to `kept`, and how early a range may start to be cut from it."""
        with self._whole_lock:
            if self._whole is None or self._whole[0] is not kept or self._whole[1] != cursor:
                stored, tail = self.stored(None, cursor), _own(kept.summary)
                reach = cursor if stored.runs.empty or tail.runs.empty else merge_reach(stored.runs, tail.runs)
                self._whole = (kept, cursor, join(stored, tail), min(reach, cursor))
            return self._whole[2], self._whole[3]

    def _kept_tail(self, cursor: pd.Timestamp, end: pd.Timestamp | None, slot_s: float) -> _Tail | None:
        state = _tail_state(self.db, cursor, slot_s)
        newest = max((t for t in (state[3], state[5]) if t is not None), default=None)
        if end is not None and newest is not None and to_ms(end.to_pydatetime()) <= newest:
            return None
        with self._tail_lock:
            kept = self._tail
            if kept is not None and kept.state != state and self._may_lag(kept, state):
                self._catch_up(cursor, slot_s)
            elif kept is None or kept.state != state:
                made = summarise_raw(self.db, cursor, None, slot_s)
                if _tail_state(self.db, cursor, slot_s) != state:
                    return None
                kept = self._tail = _Tail(state, made, time.monotonic())
                self.version += 1
        return kept

    @contextlib.contextmanager
    def making(self) -> Iterator[None]:
        """While a page is made: a catch-up of the raw rows' summary (0.2 s of the GIL) waits
        for it rather than slowing it down."""
        with self._making_lock:
            self._making += 1
        try:
            yield
        finally:
            with self._making_lock:
                self._making -= 1

    def _may_lag(self, kept: _Tail, state: tuple[Any, ...]) -> bool:
        """Whether `kept` may stand for the raw rows of `state`: only rounds came in since."""
        same = kept.state[:2] == state[:2] and kept.state[-1] == state[-1]
        return same and _only_added(kept.state, state) and time.monotonic() - kept.made < self.lag_s

    def _catch_up(self, cursor: pd.Timestamp, slot_s: float) -> None:
        """The tail summarised again in the background, once the pages being made are."""
        if self._catching_up is not None and self._catching_up.is_alive():
            return
        self._catching_up = threading.Thread(
            target=self._summarise_later, args=(cursor, slot_s), name="tail", daemon=True
        )
        self._catching_up.start()

    def _summarise_later(self, cursor: pd.Timestamp, slot_s: float) -> None:
        time.sleep(SETTLE_S)
        deadline = time.monotonic() + YIELD_S
        while self._making and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            began = time.monotonic()
            state = _tail_state(self.db, cursor, slot_s)
            # rounds that came in while it was made are in it or not: the state it is kept with,
            # the one before, is then unequal to the store's, and the next page catches up again
            made = summarise_raw(self.db, cursor, None, slot_s)
            with self._tail_lock:
                now = self._tail
                if now is not None and (now.state[:2] != state[:2] or not _only_added(now.state, state)):
                    return  # the cursor moved, or a page summarised newer rows meanwhile: theirs stays
                self._tail = kept = _Tail(state, made, began)
                self.version += 1
            if self.cursor == cursor:
                self._joined(kept, cursor)  # and joined to the stored ones: the next page cuts its range at once
        except TunnelwatchError as exc:  # the store gone or unreadable: said, the next page says it too
            log.warning("summarising the raw rows after the cursor: %s", exc)
        except Exception:  # the next page summarises in the foreground and reports what failed
            log.exception("summarising the raw rows after the cursor")


def _own(kept: Summary) -> Summary:
    """A kept summary's frames are shared: each caller gets its own objects (copy on write does the rest)."""
    return Summary(*(frame.copy(deep=False) for frame in (kept.runs, kept.hourly, kept.latency, kept.coverage)))


def _only_added(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    """Whether the raw rows of `new` (a _tail_state) can be those of `old` and more: the
    counts and the newest starts never went down (a store replaced under the same cursor)."""
    counts = new[2] >= old[2] and new[4] >= old[4]
    newest = all(b is not None and b >= a for a, b in ((old[3], new[3]), (old[5], new[5])) if a is not None)
    return counts and newest


def _tail_state(db: Store, cursor: pd.Timestamp, slot_s: float) -> tuple[Any, ...]:
    return (cursor, slot_s, *_raw_state(db, cursor), _path_rows(db))


def _path_rows(db: Store) -> tuple[tuple[Any, ...], ...]:
    return tuple(load_paths(db).itertuples(index=False, name=None))


def _stack(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    return new if old.empty else old if new.empty else pd.concat([old, new], ignore_index=True)


def _plain(frame: pd.DataFrame, empty: pd.DataFrame) -> pd.DataFrame:
    """As `_rows` gives it: `empty` when there is no row, else numbered from 0."""
    return empty if frame.empty else frame.reset_index(drop=True)
