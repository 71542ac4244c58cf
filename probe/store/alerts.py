"""The alerts of a vantage point's store: outages as the daemon found them round by round
(analysis/alerts.py decides them), and how far the rounds have been judged.

One alert per (target, path) outage, '*' as the target for a path's degradation; at most one
open alert per pair (an index says so). The state lives in the store so that a restarted
daemon neither repeats an alert it has sent nor forgets one that is open.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

ALERT_COLUMNS = (
    "path",
    "target",
    "grp",
    "verdict",
    "rules",
    "blocking",
    "failure",
    "detail",
    "start_ms",
    "end_ms",
    "announced",
    "announced_verdict",
    "updated_ms",
)
DOWN, BACK = "down", "back"  # what has been announced of an alert ('' : nothing yet)


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    path: str
    target: str
    grp: str
    verdict: str
    rules: tuple[str, ...]
    blocking: str = ""
    failure: str = ""
    detail: str = ""
    start_ms: int
    end_ms: int | None = None
    announced: str = ""
    announced_verdict: str = ""
    updated_ms: int = 0
    id: int | None = None

    @property
    def open(self) -> bool:
        return self.end_ms is None

    def changed(self, **fields: Any) -> Alert:
        return replace(self, **fields)

    def row(self) -> tuple[Any, ...]:
        values = {**{c: getattr(self, c) for c in ALERT_COLUMNS}, "rules": json.dumps(list(self.rules))}
        return tuple(values[c] for c in ALERT_COLUMNS)


def _alert(row: sqlite3.Row | tuple[Any, ...]) -> Alert:
    fields = dict(zip(("id", *ALERT_COLUMNS), row, strict=True))
    fields["rules"] = tuple(json.loads(fields["rules"]))
    return Alert(**fields)


SELECT = f"SELECT id, {', '.join(ALERT_COLUMNS)} FROM alerts"


def open_alerts(db: sqlite3.Connection) -> list[Alert]:
    return [_alert(r) for r in db.execute(f"{SELECT} WHERE end_ms IS NULL ORDER BY start_ms, path, target")]


def recent_alerts(db: sqlite3.Connection, since_ms: int) -> list[Alert]:
    """Open alerts and those that ended after since_ms, oldest first."""
    query = f"{SELECT} WHERE end_ms IS NULL OR end_ms >= ? ORDER BY start_ms, path, target"
    return [_alert(r) for r in db.execute(query, [since_ms])]


def save(db: sqlite3.Connection, alerts: Sequence[Alert]) -> None:
    """Insert new alerts (no id) and update known ones; the caller holds the transaction."""
    for alert in alerts:
        if alert.id is None:
            db.execute(
                f"INSERT INTO alerts ({', '.join(ALERT_COLUMNS)}) VALUES ({', '.join('?' * len(ALERT_COLUMNS))})",
                alert.row(),
            )
        else:
            db.execute(
                f"UPDATE alerts SET {', '.join(f'{c} = ?' for c in ALERT_COLUMNS)} WHERE id = ?",
                [*alert.row(), alert.id],
            )


def evaluated_until(db: sqlite3.Connection) -> int | None:
    row = db.execute("SELECT evaluated_ms FROM alerts_cursor").fetchone()
    return None if row is None else int(row[0])


def set_evaluated(db: sqlite3.Connection, until_ms: int) -> None:
    db.execute(
        "INSERT INTO alerts_cursor (id, evaluated_ms) VALUES (1, ?) "
        "ON CONFLICT (id) DO UPDATE SET evaluated_ms = excluded.evaluated_ms",
        [until_ms],
    )
