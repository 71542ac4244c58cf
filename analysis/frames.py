"""The only analysis module that touches the store: raw rows and summaries as DataFrames,
and the writing of summaries by compaction.

A store is a vantage point's SQLite file (a Path) or the fleet's central PostgreSQL
(probe/store/central.py, a `Source` with its URL): the tables and columns are the same, so is the
SQL. The central store holds many vantage points; analysis reads one at a time (`vantage`),
as verdicts compare the paths of one vantage point's rounds.

Dtypes are defined once here. Filtering by time, target and path happens in the SQL query,
and only the columns analysis needs are read. `load_summary` is what commands use: the
stored summaries before the cursor joined to the raw rows after it, summarised alike.
"""

from __future__ import annotations

import contextlib
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
from probe.store.sqlite import SQLiteStore, StoreDamaged, look_over, store_error

from .rollup import (
    COVERAGE_COLUMNS,
    HOURLY_COLUMNS,
    LATENCY_COLUMNS,
    RUN_COLUMNS,
    RUN_KEY,
    Summary,
    join,
    merge_coverage,
    merge_runs,
    summarise,
)

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
    "total_ms": "float64",
    "loop_lag_ms": "float64",
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


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else round(moment.timestamp() * 1000)


def _where(
    db: Store, since: datetime | None, until: datetime | None, filters: dict[str, Sequence[str]]
) -> tuple[str, list]:
    clauses, args = [], []
    if (vantage := _source(db).vantage) is not None:
        clauses.append("vantage = ?")
        args.append(vantage)
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


def _frame(db: Store, table: str, columns: dict[str, str], where: str, args: list) -> pd.DataFrame:
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
    frame = _frame(db, "measurements", MEASUREMENT_COLUMNS, where, args)
    return frame.rename(columns={"grp": "group"})


def load_heartbeats(db: Store, since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
    where, args = _where(db, since, until, {})
    frame = _frame(db, "heartbeats", HEARTBEAT_COLUMNS, where, args)
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
COMPACT_MARGIN = pd.Timedelta(hours=1)  # rows may be written this late (the writer buffers)
DAY_MS = 86_400_000


def _ts(ms: pd.Series) -> pd.Series:
    return pd.to_datetime(ms.astype("int64"), unit="ms", utc=True)


def _query(db: Store, sql: str, args: Sequence[object] = ()) -> list[tuple]:
    conn = _connect(db)
    try:
        return conn.execute(sql, list(args)).fetchall()
    except _db_errors(conn) as exc:
        if "no such table" in str(exc) or "does not exist" in str(exc):
            return []  # a store without summaries (from before them, or the central one): all is raw
        raise _read_error(db, exc, "read") from None
    finally:
        conn.close()


def _mine(db: Store) -> tuple[str, list]:
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
        [_ms(after) if after is not None else -(2**62)],
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


def load_summary(db: Store, since: datetime | None, until: datetime | None, slot_s: float) -> Summary:
    """Everything analysis needs of [since, until): stored summaries before the cursor, raw
    rows after it."""
    start = None if since is None else pd.Timestamp(since)
    end = None if until is None else pd.Timestamp(until)
    cursor = read_cursor(db)  # says so if there is no store
    stored = Summary.empty()
    if cursor is not None and (start is None or start < cursor):
        stored = _stored(db, start, cursor if end is None else min(end, cursor))
    tail_from = start if cursor is None or (start is not None and start > cursor) else cursor
    summary = join(stored, summarise_raw(db, tail_from, end, slot_s))
    if start is None and end is None:
        return summary
    return summary.clip(start or pd.Timestamp.min.tz_localize("UTC"), end or pd.Timestamp.max.tz_localize("UTC"))


def _stored(db: Store, start: pd.Timestamp | None, end: pd.Timestamp) -> Summary:
    lo, hi = (_ms(start.to_pydatetime()) if start is not None else -(2**62)), _ms(end.to_pydatetime())
    mine, vantage = _mine(db)
    runs = pd.DataFrame.from_records(
        _query(
            db,
            f"SELECT target, path, {', '.join(RUN_KEY)}, first_ms, last_ms, rounds FROM verdict_runs "
            f"WHERE last_ms >= ? AND first_ms < ?{mine} ORDER BY first_ms",
            [lo, hi, *vantage],
        ),
        columns=[c if c not in ("first", "last") else f"{c}_ms" for c in RUN_COLUMNS],
    )
    hour_lo = lo - lo % 3_600_000
    hourly = pd.DataFrame.from_records(
        _query(
            db,
            f"SELECT hour_ms, grp, path, probes, failing FROM hourly WHERE hour_ms >= ? AND hour_ms < ?{mine}",
            [hour_lo, hi, *vantage],
        ),
        columns=["hour_ms", *HOURLY_COLUMNS[1:]],
    )
    latency = pd.DataFrame.from_records(
        _query(
            db,
            f"SELECT hour_ms, {', '.join(LATENCY_COLUMNS[1:])} FROM hourly_latency "
            f"WHERE hour_ms >= ? AND hour_ms < ?{mine}",
            [hour_lo, hi, *vantage],
        ),
        columns=["hour_ms", *LATENCY_COLUMNS[1:]],
    )
    coverage = pd.DataFrame.from_records(
        _query(
            db,
            f"SELECT start_ms, end_ms FROM coverage WHERE end_ms > ? AND start_ms < ?{mine} ORDER BY start_ms",
            [lo, hi, *vantage],
        ),
        columns=["start_ms", "end_ms"],
    )
    empty = Summary.empty()
    runs = (
        runs.assign(first=_ts(runs.pop("first_ms")), last=_ts(runs.pop("last_ms")))[RUN_COLUMNS]
        if len(runs)
        else empty.runs
    )
    hourly = hourly.assign(hour=_ts(hourly.pop("hour_ms")))[HOURLY_COLUMNS] if len(hourly) else empty.hourly
    latency = latency.assign(hour=_ts(latency.pop("hour_ms")))[LATENCY_COLUMNS] if len(latency) else empty.latency
    coverage = (
        pd.DataFrame({"start": _ts(coverage["start_ms"]), "end": _ts(coverage["end_ms"])})
        if len(coverage)
        else empty.coverage
    )
    return Summary(runs, hourly, latency, coverage)


def _writable(db: Path) -> sqlite3.Connection:
    SQLiteStore(db).close()  # creates or migrates the schema, and refuses a damaged store
    try:
        conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        conn.execute("PRAGMA cell_size_check = ON")
    except sqlite3.Error as exc:
        raise store_error(db, exc, "open the store") from None
    return conn


def write_summary(db: Path, summary: Summary, expected: pd.Timestamp | None, end: pd.Timestamp, slot_s: float) -> bool:
    """Add a summary of the rounds before `end` and move the cursor to `end`, in one
    transaction, if the cursor is still `expected`. Runs and coverage continue the stored ones."""
    conn = _writable(db)
    try:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT until_ms FROM rollup_cursor").fetchone()
        if (row[0] if row else None) != (None if expected is None else _ms(expected.to_pydatetime())):
            conn.execute("ROLLBACK")
            return False
        _write_runs(conn, summary.runs)
        conn.executemany(
            "INSERT INTO hourly (hour_ms, grp, path, probes, failing) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE "
            "SET probes = probes + excluded.probes, failing = failing + excluded.failing",
            [
                (_ms(h), g, p, int(n), int(f))
                for h, g, p, n, f in summary.hourly[HOURLY_COLUMNS].itertuples(index=False)
            ],
        )
        values = LATENCY_COLUMNS[3:]
        conn.executemany(
            f"INSERT INTO hourly_latency (hour_ms, path, samples, {', '.join(values)}) "
            f"VALUES ({', '.join('?' * len(LATENCY_COLUMNS))}) ON CONFLICT DO UPDATE SET samples = samples + "
            "excluded.samples, "
            + ", ".join(
                f"{v} = (coalesce({v}, excluded.{v}) * samples + coalesce(excluded.{v}, {v}) * excluded.samples) "
                "/ (samples + excluded.samples)"
                for v in values
            ),
            [
                (_ms(r[0]), r[1], int(r[2]), *(None if pd.isna(x) else float(x) for x in r[3:]))
                for r in summary.latency[LATENCY_COLUMNS].itertuples(index=False)
            ],
        )
        _write_coverage(conn, summary.coverage, slot_s)
        conn.execute(
            "INSERT INTO rollup_cursor (id, until_ms, slot_s) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE "
            "SET until_ms = excluded.until_ms, slot_s = excluded.slot_s",
            [_ms(end), slot_s],
        )
        conn.execute("COMMIT")
        return True
    except sqlite3.Error as exc:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # a damaged store may refuse that too
                conn.execute("ROLLBACK")
        raise store_error(db, exc, "write summaries") from None
    finally:
        conn.close()


def _write_runs(conn: sqlite3.Connection, runs: pd.DataFrame) -> None:
    if runs.empty:
        return
    since = _ms(runs["first"].min()) - DAY_MS
    rows = conn.execute(
        f"SELECT id, target, path, {', '.join(RUN_KEY)}, first_ms, last_ms, rounds FROM verdict_runs "
        "WHERE last_ms >= ?",
        [since],
    ).fetchall()
    old = pd.DataFrame.from_records(rows, columns=["id", "target", "path", *RUN_KEY, "first", "last", "rounds"])
    if len(old):
        old = old.sort_values("last").groupby(["target", "path"]).tail(1)
        old["first"], old["last"] = _ts(old["first"]), _ts(old["last"])
    merged = merge_runs(old, runs.assign(id=None))
    grown = merged[merged["id"].notna()]
    conn.executemany(
        "UPDATE verdict_runs SET last_ms = ?, rounds = ? WHERE id = ?",
        [(_ms(t), int(n), int(i)) for t, n, i in zip(grown["last"], grown["rounds"], grown["id"], strict=True)],
    )
    new = merged[merged["id"].isna()]
    conn.executemany(
        f"INSERT INTO verdict_runs (target, path, {', '.join(RUN_KEY)}, first_ms, last_ms, rounds) "
        f"VALUES ({', '.join('?' * (len(RUN_KEY) + 5))})",
        [(*r[:-3], _ms(r[-3]), _ms(r[-2]), int(r[-1])) for r in new[RUN_COLUMNS].itertuples(index=False)],
    )


def _write_coverage(conn: sqlite3.Connection, coverage: pd.DataFrame, slot_s: float) -> None:
    if coverage.empty:
        return
    reach = _ms(coverage["start"].min()) - round(slot_s * 1000 * 3)
    rows = conn.execute("SELECT start_ms, end_ms FROM coverage WHERE end_ms >= ?", [reach]).fetchall()
    old = pd.DataFrame(
        {
            "start": _ts(pd.Series([r[0] for r in rows], dtype="int64")),
            "end": _ts(pd.Series([r[1] for r in rows], dtype="int64")),
        }
    )
    # Spans that pause less than the gap allowance are one span.
    allowance = pd.Timedelta(seconds=1.5 * slot_s)
    widened = pd.DataFrame({"start": old["start"], "end": old["end"] + allowance})
    merged = merge_coverage(widened, coverage.assign(end=coverage["end"] + allowance))
    merged["end"] -= allowance
    conn.execute("DELETE FROM coverage WHERE end_ms >= ?", [reach])
    conn.executemany(
        "INSERT INTO coverage (start_ms, end_ms) VALUES (?, ?)",
        [(_ms(a), _ms(b)) for a, b in merged[COVERAGE_COLUMNS].itertuples(index=False)],
    )


def delete_raw(db: Path, before: pd.Timestamp, keep_unforwarded: bool = False) -> int:
    """Delete raw rows that started before `before`, a day per transaction so the daemon's
    writer is never kept waiting long. In fleet mode (`keep_unforwarded`) rows the forwarder
    has not uploaded yet stay (probe/fleet/forwarder.py)."""
    measurements, heartbeats = "", ""
    if keep_unforwarded:
        measurements = " AND id <= (SELECT coalesce(max(measurement_id), 0) FROM forward_cursor)"
        heartbeats = " AND rowid <= (SELECT coalesce(max(heartbeat_rowid), 0) FROM forward_cursor)"
    conn = _writable(db)
    deleted = 0
    try:
        oldest = conn.execute("SELECT MIN(started_at_ms) FROM measurements").fetchone()[0]
        limit = _ms(before.to_pydatetime())
        cut = oldest
        while cut is not None and cut < limit:
            cut = min(limit, cut + DAY_MS)
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                deleted += conn.execute(
                    f"DELETE FROM measurements WHERE started_at_ms < ?{measurements}", [cut]
                ).rowcount
                conn.execute(f"DELETE FROM heartbeats WHERE started_at_ms < ?{heartbeats}", [cut])
    except sqlite3.Error as exc:
        raise store_error(db, exc, "delete old raw rows") from None
    finally:
        conn.close()
    return deleted
