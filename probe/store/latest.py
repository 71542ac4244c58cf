"""What `tunnelwatch status` reads: a store's newest rows, found by its indexes.

The last heartbeat, each (target, path)'s newest measurement and newest failure, each looked
for in a window before the newest row (the `started_at_ms` indexes), so a status costs the
same on a day's store as on a year's. The store is opened read-only and looked over
(`look_over`) as every command does; a read that meets damage refuses it.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probe.store.file import StoreDamaged, look_over, store_error

BEAT_COLUMNS = ("round_id", "started_at_ms", "finished_at_ms")
PAIR_COLUMNS = ("target", "path", "grp", "ok", "failure", "failed_operation", "started_at_ms")


@dataclass(frozen=True, slots=True)
class Latest:
    heartbeat: dict[str, Any] | None  # the newest round stored (by its end)
    pairs: list[dict[str, Any]]  # each (target, path)'s newest measurement, by group, target and path
    failures: list[dict[str, Any]]  # each (target, path)'s newest failure


def read_latest(path: Path, now_ms: int, failures_ms: int) -> Latest:
    """`latest` of the store at `path`, opened read-only and looked over."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise store_error(path, exc, "open the store") from None
    with contextlib.closing(db):
        try:
            if (problem := look_over(db)) is not None:
                raise StoreDamaged(path, problem)
            return latest(db, now_ms, failures_ms)
        except sqlite3.Error as exc:
            raise store_error(path, exc, "read the store") from None


def latest(db: sqlite3.Connection, now_ms: int, failures_ms: int) -> Latest:
    """The heartbeat that ended last among the rounds that started within `now_ms` of the
    newest; the newest measurement of each pair measured within `now_ms` of the newest
    measurement, and the newest failure of each within `failures_ms` of it."""
    return Latest(_heartbeat(db, now_ms), _newest(db, now_ms), _newest(db, failures_ms, failures_only=True))


def _heartbeat(db: sqlite3.Connection, window_ms: int) -> dict[str, Any] | None:
    rows = db.execute(
        f"SELECT {', '.join(BEAT_COLUMNS)} FROM heartbeats "
        "WHERE started_at_ms >= (SELECT MAX(started_at_ms) FROM heartbeats) - ? "
        "ORDER BY finished_at_ms DESC LIMIT 1",
        [window_ms],
    ).fetchall()
    return dict(zip(BEAT_COLUMNS, rows[0], strict=True)) if rows else None


def _newest(db: sqlite3.Connection, window_ms: int, failures_only: bool = False) -> list[dict[str, Any]]:
    rows: Sequence[tuple[Any, ...]] = db.execute(
        f"SELECT {', '.join('m.' + c for c in PAIR_COLUMNS)} FROM measurements m JOIN "
        "(SELECT MAX(id) AS id FROM measurements "
        "WHERE started_at_ms >= (SELECT MAX(started_at_ms) FROM measurements) - ?"
        f"{' AND ok = 0' if failures_only else ''} GROUP BY target, path) newest ON m.id = newest.id "
        "ORDER BY m.grp, m.target, m.path",
        [window_ms],
    ).fetchall()
    return [dict(zip(PAIR_COLUMNS, row, strict=True)) for row in rows]
