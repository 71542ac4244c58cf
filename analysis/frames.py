"""The analysis side's reading of the store, read-only: raw rows and stored summaries as
DataFrames. compaction.py alone writes.

A store is a vantage point's SQLite file (a Path) or the fleet's central PostgreSQL
(probe/store/central.py, a `Source` with its URL): the tables and columns are the same, so is the
SQL. The central store holds many vantage points; analysis reads one at a time (`vantage`),
as verdicts compare the paths of one vantage point's rounds.

Dtypes are defined once here. Filtering by time, target and path happens in the SQL query,
and only the columns analysis needs are read. ranges.py puts a range's summary together:
the stored summaries before the cursor and the raw rows after it, summarised alike.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from pandas.api.types import union_categoricals

from probe.errors import StoreError
from probe.pgurl import mask, redact
from probe.store.file import StoreDamaged, look_over, store_error
from probe.store.schema import (
    PATH_COLUMNS,
    SummaryTable,
    to_ms,
)

from .summary import Summary, summarise

# The columns analysis reads, and their dtypes.
MEASUREMENT_DTYPES: dict[str, str] = {
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
    "total_ms": "float64",
    "loop_lag_ms": "float64",
    "dns_rcode": "object",
    "addresses": "str",
    "status": "Int64",
    "body_length": "Int64",
    "title": "object",
}
HEARTBEAT_DTYPES: dict[str, str] = {
    "round_id": "str",
    "target": "object",
    "started_at_ms": "int64",
    "finished_at_ms": "int64",
    "scheduled_at_ms": "Int64",
}
CHUNK_ROWS = 100_000
CATEGORIES = {
    "round_id",
    "target",
    "grp",
    "path",
    "kind",
    "failure",
    "failed_operation",
    "dns_rcode",
    "addresses",
    "title",
}


@dataclass(frozen=True, slots=True)
class Source:
    """Where analysis reads: a SQLite store's path or a PostgreSQL URL, and the vantage
    point whose rows to read (None: every row, as in a vantage point's own store)."""

    location: Path | str
    vantage: str | None = None

    @property
    def central(self) -> bool:
        return isinstance(self.location, str)

    def __str__(self) -> str:
        return redact(self.location) if isinstance(self.location, str) else str(self.location)


Store = Path | Source


def _source(db: Store) -> Source:
    return db if isinstance(db, Source) else Source(db)


class _Central:
    """A read-only PostgreSQL connection that takes the SQLite store's SQL (`?` parameters)."""

    def __init__(self, url: str) -> None:
        import psycopg  # only for the central store

        self.errors = psycopg.Error
        self._conn = psycopg.connect(url, connect_timeout=10, autocommit=True)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), list(args))

    def close(self) -> None:
        self._conn.close()


def _connect(db: Store) -> Any:
    source = _source(db)
    if isinstance(source.location, str):
        try:
            return _Central(source.location)
        except Exception as exc:  # psycopg.Error, imported lazily; the driver may quote the URL
            raise StoreError(f"{source}: cannot open the central store: {mask(str(exc), source.location)}") from None
    if not source.location.exists():
        raise StoreError(f"{source}: no store there; run `tunnelwatch run` or `tunnelwatch probe` first")
    conn = None
    try:
        conn = sqlite3.connect(f"file:{source.location}?mode=ro", uri=True)
        conn.execute("PRAGMA cell_size_check = ON")  # a damaged page is an error when read, not odd rows
        problem = look_over(conn)  # milliseconds: damage elsewhere is found by the read that meets it
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        raise store_error(source.location, exc, "open the store") from None
    if problem is not None:
        conn.close()
        raise StoreDamaged(source.location, problem)
    return conn


def _db_errors(conn: Any) -> tuple[type[Exception], ...]:
    return (sqlite3.Error,) if isinstance(conn, sqlite3.Connection) else (conn.errors,)


def _read_error(db: Store, exc: Exception, doing: str) -> StoreError:
    """What a failed read says: a damaged SQLite store says so (probe/store/sqlite.py)."""
    source = _source(db)
    if isinstance(exc, sqlite3.Error) and isinstance(source.location, Path):
        return store_error(source.location, exc, doing)
    detail = mask(str(exc), source.location) if isinstance(source.location, str) else str(exc)
    return StoreError(f"{source}: cannot {doing}: {detail}")


def vantages(db: Store) -> list[str]:
    """The vantage points a store holds rows of (the central store keeps each one's paths)."""
    table = "paths" if _source(db).central else "heartbeats"
    return [row[0] for row in _query(db, f"SELECT DISTINCT vantage FROM {table} ORDER BY vantage")]


def _where(
    db: Store, since: datetime | None, until: datetime | None, filters: dict[str, Sequence[str]]
) -> tuple[str, list[object]]:
    clauses: list[str] = []
    args: list[object] = []
    if (vantage := _source(db).vantage) is not None:
        clauses.append("vantage = ?")
        args.append(vantage)
    if since is not None:
        clauses.append("started_at_ms >= ?")
        args.append(to_ms(since))
    if until is not None:
        clauses.append("started_at_ms < ?")
        args.append(to_ms(until))
    for column, values in filters.items():
        if values:
            clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
            args.extend(values)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def _frame(db: Store, table: str, columns: dict[str, str], where: str, args: Sequence[object]) -> pd.DataFrame:
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
    except _db_errors(conn) as exc:
        raise _read_error(db, exc, f"read {table}") from None
    finally:
        conn.close()
    if not chunks:
        frame = pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})
    else:
        frame = pd.DataFrame(
            {
                c: union_categoricals([ch[c] for ch in chunks])
                if c in CATEGORIES
                else pd.concat([ch[c] for ch in chunks], ignore_index=True)
                for c in columns
            }
        )
    frame["started_at"] = pd.to_datetime(frame.pop("started_at_ms"), unit="ms", utc=True)
    return frame


def load_measurements(
    db: Store,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    targets: Sequence[str] = (),
    paths: Sequence[str] = (),
) -> pd.DataFrame:
    where, args = _where(db, since, until, {"target": targets, "path": paths})
    frame = _frame(db, "measurements", MEASUREMENT_DTYPES, where, args)
    return frame.rename(columns={"grp": "group"})


def load_heartbeats(db: Store, since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
    where, args = _where(db, since, until, {})
    frame = _frame(db, "heartbeats", HEARTBEAT_DTYPES, where, args)
    frame["finished_at"] = pd.to_datetime(frame.pop("finished_at_ms"), unit="ms", utc=True)
    frame["scheduled_at"] = pd.to_datetime(frame.pop("scheduled_at_ms"), unit="ms", utc=True)
    return frame


def load_paths(db: Store) -> pd.DataFrame:
    source = _source(db)
    where, args = (" WHERE vantage = ?", [source.vantage]) if source.central and source.vantage else ("", [])
    conn = _connect(db)
    try:
        rows = conn.execute(f"SELECT {', '.join(PATH_COLUMNS)} FROM paths{where}", args).fetchall()
    except _db_errors(conn) as exc:
        if "no such table" not in str(exc) and "does not exist" not in str(exc):
            raise _read_error(db, exc, "read paths") from None
        rows = []  # a store from before paths were recorded: analysis falls back on names
    finally:
        conn.close()
    return pd.DataFrame.from_records(rows, columns=list(PATH_COLUMNS))


ROUND_SPAN = pd.Timedelta(minutes=15)  # the longest a round's probes are spread over
HOUR_MS = 3_600_000


def utc_times(ms: pd.Series) -> pd.Series:
    """Stored times (Unix ms) as UTC times."""
    return pd.to_datetime(ms.astype("int64"), unit="ms", utc=True)


def _query(db: Store, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    conn = _connect(db)
    try:
        rows: list[tuple[Any, ...]] = conn.execute(sql, list(args)).fetchall()
        return rows
    except _db_errors(conn) as exc:
        if "no such table" in str(exc) or "does not exist" in str(exc):
            return []  # a store without summaries (from before them, or the central one): all is raw
        raise _read_error(db, exc, "read") from None
    finally:
        conn.close()


def _mine(db: Store) -> tuple[str, list[str]]:
    """The central store's summaries are per vantage point: the clause that picks ours."""
    source = _source(db)
    return (" AND vantage = ?", [source.vantage]) if source.central and source.vantage else ("", [])


def read_cursor(db: Store) -> pd.Timestamp | None:
    clause, args = _mine(db)
    rows = _query(db, f"SELECT until_ms FROM rollup_cursor WHERE 1 = 1{clause}", args)
    return pd.Timestamp(rows[0][0], unit="ms", tz="UTC") if rows else None


def first_raw_hour(db: Path, after: pd.Timestamp | None) -> pd.Timestamp | None:
    """The hour of the first raw row at or after `after`."""
    rows = _query(
        db,
        "SELECT MIN(started_at_ms) FROM measurements WHERE started_at_ms >= ?",
        [to_ms(after) if after is not None else -(2**62)],
    )
    if not rows or rows[0][0] is None:
        return None
    return pd.Timestamp(rows[0][0], unit="ms", tz="UTC").floor("1h")


def summarise_raw(db: Store, start: pd.Timestamp | None, end: pd.Timestamp | None, slot_s: float) -> Summary:
    """The summary of the rounds that started in [start, end), from raw rows."""
    since = None if start is None else (start - ROUND_SPAN).to_pydatetime()
    until = None if end is None else (end + ROUND_SPAN).to_pydatetime()
    m = load_measurements(db, since, until)
    if len(m):
        first = m.groupby("round_id", observed=True)["started_at"].transform("min")
        inside = pd.Series(True, index=m.index)
        if start is not None:
            inside &= first >= start
        if end is not None:
            inside &= first < end
        m = m[inside]
    beats = load_heartbeats(
        db, None if start is None else start.to_pydatetime(), None if end is None else end.to_pydatetime()
    )
    return summarise(m, beats, load_paths(db), slot_s)


def _rows(
    db: Store,
    table: SummaryTable,
    where: str,
    bounds: tuple[int, ...],
    empty: pd.DataFrame,
    order: str | None = None,
    with_id: bool = False,
) -> pd.DataFrame:
    """A summary table's rows of our vantage point as a frame like `empty`, whose columns are
    the table's in order (frame_columns, then the id `with_id`); the times (stored as Unix
    ms) as UTC times."""
    mine, vantage = _mine(db)
    select = ", ".join([*frame_columns(table), *(["id"] if with_id else [])])
    sql = f"SELECT {select} FROM {table.name} WHERE {where}{mine}" + (f" ORDER BY {order}" if order else "")
    rows = _query(db, sql, [*bounds, *vantage])
    if not rows:
        return empty
    frame = pd.DataFrame.from_records(rows, columns=list(empty.columns))
    for column, dtype in empty.dtypes.items():
        if isinstance(dtype, pd.DatetimeTZDtype):
            frame[column] = utc_times(frame[column])
    return frame


def frame_columns(table: SummaryTable) -> tuple[str, ...]:
    """The columns of a summary table that the Summary's frame of it holds, in the frame's
    order (summary.py names them: `first` for first_ms, `group` for grp): all but the row id."""
    return tuple(c for c in table.columns if c != "id")
