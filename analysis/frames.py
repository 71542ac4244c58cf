"""The only module that reads the store: measurements, heartbeats and paths as DataFrames.

Dtypes are defined once here. Filtering by time, target, path and group happens in the SQL
query, and only the columns analysis needs are read.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pandas as pd
from pandas.api.types import union_categoricals

from probe.errors import StoreError

MEASUREMENT_COLUMNS: dict[str, str] = {
    "round_id": "str",
    "target": "str",
    "grp": "str",
    "path": "str",
    "kind": "str",
    "started_at_ms": "int64",
    "ok": "bool",
    "failure": "object",
    "failed_operation": "object",
    "connect_ms": "float64",
    "first_byte_ms": "float64",
    "dns_rcode": "object",
    "addresses": "str",
    "status": "Int64",
    "body_length": "Int64",
    "title": "object",
}
HEARTBEAT_COLUMNS: dict[str, str] = {
    "round_id": "str",
    "target": "object",
    "started_at_ms": "int64",
    "finished_at_ms": "int64",
    "scheduled_at_ms": "Int64",
}
PATH_COLUMNS = ("name", "kind", "label", "endpoint_target")
CHUNK_ROWS = 100_000
CATEGORIES = {"round_id", "target", "grp", "path", "kind", "failure", "failed_operation", "dns_rcode", "addresses",
              "title"}  # fmt: skip


def _connect(db: Path) -> sqlite3.Connection:
    if not db.exists():
        raise StoreError(f"{db}: no store there; run `tunnelwatch run` or `tunnelwatch probe` first")
    try:
        return sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"{db}: cannot open the store: {exc}") from None


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else round(moment.timestamp() * 1000)


def _where(since: datetime | None, until: datetime | None, filters: dict[str, Sequence[str]]) -> tuple[str, list]:
    clauses, args = [], []
    if since is not None:
        clauses.append("started_at_ms >= ?")
        args.append(_ms(since))
    if until is not None:
        clauses.append("started_at_ms < ?")
        args.append(_ms(until))
    for column, values in filters.items():
        if values:
            clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
            args.extend(values)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def _frame(db: Path, table: str, columns: dict[str, str], where: str, args: list) -> pd.DataFrame:
    """Rows in chunks, each made compact (categories for repeated text) before the next is
    read, so the peak stays near the compact size rather than that of Python tuples."""
    conn = _connect(db)
    chunks = []
    try:
        cursor = conn.execute(f"SELECT {', '.join(columns)} FROM {table}{where} ORDER BY started_at_ms", args)
        while rows := cursor.fetchmany(CHUNK_ROWS):
            chunk = pd.DataFrame.from_records(rows, columns=list(columns)).astype(columns)
            for column in CATEGORIES.intersection(chunk.columns):  # few distinct values: store each once
                chunk[column] = chunk[column].astype("category")
            chunks.append(chunk)
    except sqlite3.Error as exc:
        raise StoreError(f"{db}: cannot read {table}: {exc}") from None
    finally:
        conn.close()
    if not chunks:
        frame = pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})
    else:
        frame = pd.DataFrame({
            c: union_categoricals([ch[c] for ch in chunks]) if c in CATEGORIES
            else pd.concat([ch[c] for ch in chunks], ignore_index=True)
            for c in columns
        })  # fmt: skip
    frame["started_at"] = pd.to_datetime(frame.pop("started_at_ms"), unit="ms", utc=True)
    return frame


def load_measurements(
    db: Path,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    targets: Sequence[str] = (),
    paths: Sequence[str] = (),
) -> pd.DataFrame:
    where, args = _where(since, until, {"target": targets, "path": paths})
    frame = _frame(db, "measurements", MEASUREMENT_COLUMNS, where, args)
    return frame.rename(columns={"grp": "group"})


def load_heartbeats(db: Path, since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
    where, args = _where(since, until, {})
    frame = _frame(db, "heartbeats", HEARTBEAT_COLUMNS, where, args)
    frame["finished_at"] = pd.to_datetime(frame.pop("finished_at_ms"), unit="ms", utc=True)
    frame["scheduled_at"] = pd.to_datetime(frame.pop("scheduled_at_ms"), unit="ms", utc=True)
    return frame


def load_paths(db: Path) -> pd.DataFrame:
    conn = _connect(db)
    try:
        rows = conn.execute(f"SELECT {', '.join(PATH_COLUMNS)} FROM paths").fetchall()
    except sqlite3.Error:
        rows = []  # a store from before paths were recorded: analysis falls back on names
    finally:
        conn.close()
    return pd.DataFrame.from_records(rows, columns=list(PATH_COLUMNS))
