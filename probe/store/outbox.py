"""Notifications waiting to be sent, one row per message and destination, kept in the store
so that a destination that is down (or blocked) gets every message when it is back.

A destination is named by a hash of its URL (`destination_id`): the URL may hold a secret,
and the store is copied around.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def destination_id(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def enqueue(db: sqlite3.Connection, title: str, body: str, destinations: Sequence[str], now_ms: int) -> None:
    """A message for each destination (destination_id), due now; the caller holds the transaction."""
    db.executemany(
        "INSERT INTO notifications (created_ms, destination, title, body, next_try_ms) VALUES (?, ?, ?, ?, ?)",
        [(now_ms, d, title, body, now_ms) for d in destinations],
    )


KEEP_SENT_MS = 30 * 86400 * 1000  # sent messages are kept this long, for a look back


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One message to one destination, not sent yet."""

    id: int
    destination: str
    title: str
    body: str
    created_ms: int
    attempts: int  # failed so far
    next_try_ms: int
    error: str  # of the last failed attempt


_MESSAGE = "SELECT id, destination, title, body, created_ms, attempts, next_try_ms, error FROM notifications"


def _message(row: tuple[Any, ...]) -> Message:
    return Message(**dict(zip(Message.__slots__, row, strict=True)))


def heads(db: sqlite3.Connection) -> list[Message]:
    """The oldest unsent message of each destination: a destination's messages go out in the
    order they were queued, so only its oldest one is ever due."""
    query = f"{_MESSAGE} WHERE id IN (SELECT min(id) FROM notifications WHERE sent_ms IS NULL GROUP BY destination)"
    return [_message(r) for r in db.execute(f"{query} ORDER BY id")]


def head(db: sqlite3.Connection, destination: str) -> Message | None:
    """The oldest unsent message of one destination."""
    row = db.execute(
        f"{_MESSAGE} WHERE destination = ? AND sent_ms IS NULL ORDER BY id LIMIT 1", [destination]
    ).fetchone()
    return None if row is None else _message(row)


def mark_sent(db: sqlite3.Connection, message_id: int, now_ms: int) -> None:
    """Sent; sent messages older than KEEP_SENT_MS go."""
    with db:
        db.execute("UPDATE notifications SET sent_ms = ?, error = '' WHERE id = ?", [now_ms, message_id])
        db.execute("DELETE FROM notifications WHERE sent_ms IS NOT NULL AND sent_ms < ?", [now_ms - KEEP_SENT_MS])


def mark_failed(db: sqlite3.Connection, message_id: int, error: str, next_try_ms: int) -> None:
    """A failed attempt: counted, with its reason, and tried again at next_try_ms."""
    with db:
        db.execute(
            "UPDATE notifications SET attempts = attempts + 1, error = ?, next_try_ms = ? WHERE id = ?",
            [error, next_try_ms, message_id],
        )


def drop_unknown(db: sqlite3.Connection, destinations: Sequence[str], before_ms: int) -> dict[str, int]:
    """Delete the unsent messages queued before `before_ms` for destinations not in
    `destinations` (no longer configured); how many went, per destination."""
    known = ", ".join("?" * len(destinations))
    where = f"sent_ms IS NULL AND created_ms < ? AND destination NOT IN ({known})"
    with db:
        gone = dict(
            db.execute(
                f"SELECT destination, count(*) FROM notifications WHERE {where} GROUP BY destination",
                [before_ms, *destinations],
            ).fetchall()
        )
        if gone:
            db.execute(f"DELETE FROM notifications WHERE {where}", [before_ms, *destinations])
    return gone


def counts(db: sqlite3.Connection) -> tuple[int, int]:
    """What the daemon's gauges show: messages not sent yet, and alerts open."""
    pending = db.execute("SELECT count(*) FROM notifications WHERE sent_ms IS NULL").fetchone()[0]
    opened = db.execute("SELECT count(*) FROM alerts WHERE end_ms IS NULL").fetchone()[0]
    return int(pending), int(opened)
