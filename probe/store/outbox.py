"""Notifications waiting to be sent, one row per message and destination, kept in the store
so that a destination that is down (or blocked) gets every message when it is back.

A destination is named by a hash of its URL (`destination_id`): the URL may hold a secret,
and the store is copied around.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence


def destination_id(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def enqueue(db: sqlite3.Connection, title: str, body: str, destinations: Sequence[str], now_ms: int) -> None:
    """A message for each destination (destination_id), due now; the caller holds the transaction."""
    db.executemany(
        "INSERT INTO notifications (created_ms, destination, title, body, next_try_ms) VALUES (?, ?, ?, ?, ?)",
        [(now_ms, d, title, body, now_ms) for d in destinations],
    )
