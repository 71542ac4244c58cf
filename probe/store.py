"""The only persistence code: measurements and heartbeats in SQLite (WAL).

One row per measurement plus one heartbeat row per round, written by a single writer in
batches, one transaction each: a kill -9 loses at most the batch in flight. The schema is
versioned with ``PRAGMA user_version`` and migrated forward on open. The small `Store`
protocol is what the rest of tunnelwatch uses, so another backend can follow.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from .errors import StoreError
from .model import Heartbeat, Measurement

MEASUREMENT_COLUMNS = (
    "vantage", "round_id", "target", "grp", "path", "kind", "input", "started_at_ms", "ok",
    "failure", "failed_operation", "resolve_ms", "proxy_ms", "connect_ms", "tls_ms",
    "first_byte_ms", "total_ms", "resolver", "dns_rcode", "addresses", "peer_address",
    "status", "final_url", "body_length", "body_sha256", "title", "tls_version",
    "cert_subject", "cert_issuer", "cert_not_after_ms", "tls_verified", "detail", "loop_lag_ms",
)  # fmt: skip
HEARTBEAT_COLUMNS = (
    "round_id", "vantage", "started_at_ms", "finished_at_ms", "probes", "succeeded", "config_sha256",
    "target", "scheduled_at_ms",
)  # fmt: skip

LATENCY_VALUES = tuple(f"{m}_p{q}" for m in ("connect", "first_byte", "total") for q in (10, 25, 50, 75, 90))
# The summary tables (analysis/rollup.py) as the fleet's forwarder uploads them: (table,
# columns, key, the column that says how recent a row is).
SUMMARY_TABLES = (
    ("verdict_runs", ("id", "target", "path", "state", "verdict", "rule", "blocking", "detail", "first_ms", "last_ms",
                      "rounds"), ("id",), "last_ms"),
    ("hourly", ("hour_ms", "grp", "path", "probes", "failing"), ("hour_ms", "grp", "path"), "hour_ms"),
    ("hourly_latency", ("hour_ms", "path", "samples", *LATENCY_VALUES), ("hour_ms", "path"), "hour_ms"),
    ("coverage", ("start_ms", "end_ms"), ("start_ms",), "end_ms"),
)  # fmt: skip

# Each entry moves the schema from version i to i + 1. Never edit a shipped entry: append.
MIGRATIONS = (
    """
    CREATE TABLE measurements (
        id INTEGER PRIMARY KEY,
        vantage TEXT NOT NULL,
        round_id TEXT NOT NULL,
        target TEXT NOT NULL,
        grp TEXT NOT NULL,
        path TEXT NOT NULL,
        kind TEXT NOT NULL,
        input TEXT NOT NULL,
        started_at_ms INTEGER NOT NULL,      -- Unix time, UTC
        ok INTEGER NOT NULL,
        failure TEXT,
        failed_operation TEXT,
        resolve_ms REAL, proxy_ms REAL, connect_ms REAL, tls_ms REAL,
        first_byte_ms REAL, total_ms REAL,
        resolver TEXT, dns_rcode TEXT,
        addresses TEXT NOT NULL DEFAULT '[]',  -- JSON list
        peer_address TEXT,
        status INTEGER, final_url TEXT, body_length INTEGER, body_sha256 TEXT, title TEXT,
        tls_version TEXT, cert_subject TEXT, cert_issuer TEXT, cert_not_after_ms INTEGER,
        tls_verified INTEGER,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX measurements_started_at ON measurements (started_at_ms);
    CREATE TABLE heartbeats (
        round_id TEXT PRIMARY KEY,
        vantage TEXT NOT NULL,
        started_at_ms INTEGER NOT NULL,
        finished_at_ms INTEGER NOT NULL,
        probes INTEGER NOT NULL,
        succeeded INTEGER NOT NULL,
        config_sha256 TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX heartbeats_started_at ON heartbeats (started_at_ms);
    """,
    """
    ALTER TABLE heartbeats ADD COLUMN target TEXT;
    ALTER TABLE heartbeats ADD COLUMN scheduled_at_ms INTEGER;
    """,
    """
    CREATE TABLE paths (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,                  -- direct, socks5, http, bind
        label TEXT NOT NULL DEFAULT '',
        endpoint_target TEXT                 -- the target that probes the tunnel server's port
    );
    """,
    """
    -- Summaries kept by compaction (analysis/rollup.py): everything before the cursor is here.
    CREATE TABLE rollup_cursor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        until_ms INTEGER NOT NULL,           -- rounds that started before this are summarised
        slot_s REAL NOT NULL                 -- the probing interval verdicts were judged by
    );
    CREATE TABLE verdict_runs (
        id INTEGER PRIMARY KEY,
        target TEXT NOT NULL,
        path TEXT NOT NULL,
        state TEXT NOT NULL,
        verdict TEXT NOT NULL,
        rule TEXT NOT NULL,
        blocking TEXT NOT NULL,
        detail TEXT NOT NULL,
        first_ms INTEGER NOT NULL,
        last_ms INTEGER NOT NULL,
        rounds INTEGER NOT NULL
    );
    CREATE INDEX verdict_runs_last ON verdict_runs (last_ms);
    CREATE TABLE hourly (
        hour_ms INTEGER NOT NULL,
        grp TEXT NOT NULL,
        path TEXT NOT NULL,
        probes INTEGER NOT NULL,
        failing INTEGER NOT NULL,
        PRIMARY KEY (hour_ms, grp, path)
    ) WITHOUT ROWID;
    CREATE TABLE hourly_latency (
        hour_ms INTEGER NOT NULL,
        path TEXT NOT NULL,
        samples INTEGER NOT NULL,
        connect_p10 REAL, connect_p25 REAL, connect_p50 REAL, connect_p75 REAL, connect_p90 REAL,
        first_byte_p10 REAL, first_byte_p25 REAL, first_byte_p50 REAL, first_byte_p75 REAL, first_byte_p90 REAL,
        total_p10 REAL, total_p25 REAL, total_p50 REAL, total_p75 REAL, total_p90 REAL,
        PRIMARY KEY (hour_ms, path)
    ) WITHOUT ROWID;
    CREATE TABLE coverage (
        start_ms INTEGER PRIMARY KEY,
        end_ms INTEGER NOT NULL
    );
    """,
    """
    ALTER TABLE measurements ADD COLUMN loop_lag_ms REAL;  -- probe/lag.py
    """,
    """
    -- Fleet mode (probe/forwarder.py): what has been uploaded to the central store. Rows
    -- after these ids are the backlog; compaction keeps them until they are uploaded.
    CREATE TABLE forward_cursor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        measurement_id INTEGER NOT NULL,     -- measurements.id uploaded up to
        heartbeat_rowid INTEGER NOT NULL,    -- heartbeats.rowid uploaded up to
        dropped INTEGER NOT NULL DEFAULT 0,  -- never uploaded: the backlog outgrew its bound
        summaries_ms INTEGER                 -- rollup_cursor.until_ms when summaries were last uploaded
    );
    """,
)


class Store(Protocol):
    def write(self, measurements: Sequence[Measurement], heartbeats: Sequence[Heartbeat] = ()) -> None: ...

    def record_paths(self, paths: Sequence[tuple[str, str, str, str | None]]) -> None: ...

    def measurements(self, round_id: str | None = None) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else round(moment.timestamp() * 1000)


def _measurement_row(m: Measurement) -> tuple[Any, ...]:
    return (
        m.vantage, m.round_id, m.target, m.group, m.path, m.kind, m.input, _ms(m.started_at), int(m.ok),
        m.failure, m.failed_operation, m.resolve_ms, m.proxy_ms, m.connect_ms, m.tls_ms,
        m.first_byte_ms, m.total_ms, m.resolver, m.dns_rcode, json.dumps(list(m.addresses)), m.peer_address,
        m.status, m.final_url, m.body_length, m.body_sha256, m.title, m.tls_version,
        m.cert_subject, m.cert_issuer, _ms(m.cert_not_after),
        None if m.tls_verified is None else int(m.tls_verified), m.detail, m.loop_lag_ms,
    )  # fmt: skip


def _heartbeat_row(h: Heartbeat) -> tuple[Any, ...]:
    return (
        h.round_id, h.vantage, _ms(h.started_at), _ms(h.finished_at), h.probes, h.succeeded, h.config_sha256,
        h.target, _ms(h.scheduled_at),
    )  # fmt: skip


def _insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


class SQLiteStore:
    """SQLite in WAL mode. Use from one thread at a time: it is the single writer."""

    def __init__(self, path: Path, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{path}: cannot open the store: {exc}") from None

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this tunnelwatch knows "
                f"({len(MIGRATIONS)}); upgrade tunnelwatch"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self._db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def write(self, measurements: Sequence[Measurement], heartbeats: Sequence[Heartbeat] = ()) -> None:
        """One transaction: the whole batch lands, or none of it does."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(_insert("measurements", MEASUREMENT_COLUMNS), map(_measurement_row, measurements))
            self._db.executemany(_insert("heartbeats", HEARTBEAT_COLUMNS), map(_heartbeat_row, heartbeats))
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StoreError(f"{self.path}: cannot write {len(measurements)} measurements: {exc}") from exc

    def record_paths(self, paths: Sequence[tuple[str, str, str, str | None]]) -> None:
        """What each path is (name, kind, label, endpoint target), so analysis knows which
        path is direct and which are tunnels without the config that measured them."""
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT INTO paths (name, kind, label, endpoint_target) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, label = excluded.label, "
                    "endpoint_target = excluded.endpoint_target",
                    paths,
                )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot record the paths: {exc}") from exc

    def measurements(self, round_id: str | None = None) -> list[dict[str, Any]]:
        query = f"SELECT {', '.join(MEASUREMENT_COLUMNS)} FROM measurements"
        args: tuple[Any, ...] = ()
        if round_id:
            query, args = query + " WHERE round_id = ?", (round_id,)
        rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        out = []
        for row in rows:
            record = dict(zip(MEASUREMENT_COLUMNS, row, strict=True))
            record["addresses"] = json.loads(record["addresses"])
            record["started_at"] = datetime.fromtimestamp(record.pop("started_at_ms") / 1000, UTC)
            out.append(record)
        return out

    def heartbeats(self) -> list[dict[str, Any]]:
        rows = self._db.execute(f"SELECT {', '.join(HEARTBEAT_COLUMNS)} FROM heartbeats ORDER BY started_at_ms")
        return [dict(zip(HEARTBEAT_COLUMNS, row, strict=True)) for row in rows]

    def last_heartbeat(self) -> dict[str, Any] | None:
        row = self._db.execute(
            f"SELECT {', '.join(HEARTBEAT_COLUMNS)} FROM heartbeats ORDER BY finished_at_ms DESC LIMIT 1"
        ).fetchone()
        return None if row is None else dict(zip(HEARTBEAT_COLUMNS, row, strict=True))

    def latest_per_pair(self, failures_only: bool = False) -> list[dict[str, Any]]:
        """The newest measurement (or the newest failure) of every (target, path)."""
        where = "WHERE ok = 0" if failures_only else ""
        columns = ("target", "path", "grp", "ok", "failure", "failed_operation", "started_at_ms")
        rows = self._db.execute(
            f"SELECT {', '.join('m.' + c for c in columns)} FROM measurements m JOIN "
            f"(SELECT MAX(id) AS id FROM measurements {where} GROUP BY target, path) newest ON m.id = newest.id "
            "ORDER BY m.grp, m.target, m.path"
        )
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def integrity_check(self) -> str:
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class StoreLock:
    """One daemon per store: an exclusive flock on `<store>.lock`, held while the daemon runs.
    The kernel releases it when the process dies, however it dies."""

    def __init__(self, store_path: Path) -> None:
        self.store_path = store_path
        self.path = store_path.with_name(store_path.name + ".lock")
        self._file: Any = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.path.open("a+")
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the store's lock file: {exc}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StoreError(
                f"{self.store_path}: another tunnelwatch daemon (pid {holder}) is using this store; "
                "stop it first, or give this one another store.path"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def open_store(path: Path) -> SQLiteStore:
    return SQLiteStore(path)
