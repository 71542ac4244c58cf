"""Pages kept between requests: the analysis of a long range takes seconds, a page must not.

A page's facts are kept with the state of the store they were made from: the newest round's
start and the summaries' cursor (two indexed reads, a millisecond), which change when the
daemon stores a round or compacts, and the version of the raw rows' summary the server holds
(ranges.Held), which changes when it is caught up. While the store has not changed, the kept
facts are served. When it has, facts made less than FRESH_S ago are still served as they are
(a live store changes with every target's round: without this, a page read often would be
made over and over); facts made less than STALE_S ago are served and made again in the
background (one page at a time); older ones are made again while the request waits. A page
is made from a summary of the raw rows after the cursor at most pages.TAIL_LAG_S old
(ranges.Held). A page on a live store thus lags it by FRESH_S, TAIL_LAG_S and the time to
make it, at most.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from probe.config import Config

from ..frames import read_cursor
from ..pipeline import source
from ..ranges import Held
from .pages import held, newest

log = logging.getLogger("tunnelwatch.serve")
FRESH_S = 20.0  # a page this young is served even though the store has changed since
STALE_S = 120.0  # one this old is made again while the request waits
KEEP = 32  # pages kept; the least recently asked for goes first


@dataclass(frozen=True, slots=True)
class Kept:
    state: tuple[Any, ...]
    value: Any
    made: float  # time.monotonic()


class Pages:
    """Each page's facts, by key (the page and its parameters)."""

    def __init__(self, cfg: Config, stale_s: float = STALE_S, fresh_s: float = FRESH_S) -> None:
        self.cfg = cfg
        self.stale_s, self.fresh_s = stale_s, fresh_s
        self._kept: OrderedDict[tuple[Any, ...], Kept] = OrderedDict()
        self._making: dict[tuple[Any, ...], Future[None]] = {}
        self._lock = threading.Lock()
        self._background = ThreadPoolExecutor(1, thread_name_prefix="pages")
        self._held: Held | None = None

    def held(self) -> Held:
        """The store's kept summaries (pages.held), looked up once: finding the store may ask
        the central PostgreSQL which vantage points it holds."""
        if self._held is None:
            self._held = held(self.cfg)
        return self._held

    def state(self) -> tuple[Any, ...]:
        """The store's newest round and cursor, and which summary of its raw rows the server
        holds: a page made from one that lagged the store is behind once it is caught up."""
        db = source(self.cfg)
        return newest(self.cfg), read_cursor(db), self.held().version

    def get(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        state = self.state()
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None:
                self._kept.move_to_end(key)
        if kept is None:
            with self._lock:
                under_way = self._making.get(key)
            if under_way is not None:  # being made in the background (the start's warming): wait for it
                under_way.result()
                with self._lock:
                    kept = self._kept.get(key)
        if kept is not None and kept.state == state:
            return kept.value
        age = time.monotonic() - kept.made if kept is not None else None
        if kept is not None and age is not None and age < self.fresh_s:
            return kept.value  # a live store changes every round: a page is made at most this often
        if kept is not None and age is not None and age < self.stale_s:
            self.refresh(key, make)
            return kept.value
        return self._make(key, make, state)

    def refresh(self, key: tuple[Any, ...], make: Callable[[], Any]) -> None:
        """Make the page again in the background, unless that is under way."""
        with self._lock:
            if key not in self._making:
                self._making[key] = self._background.submit(self._quietly, key, make)

    def _quietly(self, key: tuple[Any, ...], make: Callable[[], Any]) -> None:
        try:
            self._make(key, make, self.state())
        except Exception:  # a background page's failure is the next request's to report
            log.exception("making the page %s in the background", key[0])
        finally:
            with self._lock:
                self._making.pop(key, None)

    def _make(self, key: tuple[Any, ...], make: Callable[[], Any], state: tuple[Any, ...]) -> Any:
        with self.held().making():  # the raw rows' summary is caught up between pages
            value = make()  # outside the lock: pages are made side by side
        with self._lock:
            self._kept[key] = Kept(state, value, time.monotonic())
            self._kept.move_to_end(key)
            while len(self._kept) > KEEP:
                self._kept.popitem(last=False)
        return value

    def close(self) -> None:
        """The pages waiting to be made dropped, the one being made finished (it may start the
        drawing child, which the app stops next: web/draw.py)."""
        self._background.shutdown(wait=True, cancel_futures=True)
