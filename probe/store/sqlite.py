"""The SQLite store: a vantage point's own store, one file in WAL mode, written by the daemon
or `tunnelwatch probe` and read by the commands.

One row per measurement plus one heartbeat row per round (their columns are in
probe/store/schema.py), written by a single writer in batches, one transaction each: a
kill -9 loses at most the batch in flight. The file also holds what each path is, the
summaries compaction adds (analysis/compaction.py) and, in fleet mode, the spool's upload cursor
(probe/store/spool.py). The schema is versioned with ``PRAGMA user_version`` and migrated
forward on open (`MIGRATIONS`). The daemon's writer sees the store through the small `Store`
protocol.

A store is looked over when opened (`look_over`: the header, the schema's b-tree and the
newest entry of every table and index; milliseconds, whatever the file's size), and any
SQLite error that says the file is damaged becomes `StoreDamaged`, naming the file: commands
refuse such a store. Before each write the store checks that the file at its path is still
the one it has open: a store deleted or replaced under a running daemon would otherwise
take every later write with it, silently. The daemon's store (opened with its lock) then
raises `StoreLost` and `reopen()` makes it whole: a fresh store where the file was
deleted, the new file where it was replaced, and a damaged one moved aside first.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from probe.errors import StoreError
from probe.model import Heartbeat, Measurement
from probe.store.file import StoreDamaged, StoreLock, StoreLost, identity, look_over, quick_check, store_error
from probe.store.schema import HEARTBEAT_COLUMNS, MEASUREMENT_COLUMNS, PATH_COLUMNS, from_ms, migrate, to_ms

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
    ALTER TABLE measurements ADD COLUMN loop_lag_ms REAL;  -- probe/measure/lag.py
    """,
    """
    -- Fleet mode (probe/fleet/forwarder.py): what has been uploaded to the central store. Rows
    -- after these ids are the backlog; compaction keeps them until they are uploaded.
    CREATE TABLE forward_cursor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        measurement_id INTEGER NOT NULL,     -- measurements.id uploaded up to
        heartbeat_rowid INTEGER NOT NULL,    -- heartbeats.rowid uploaded up to
        dropped INTEGER NOT NULL DEFAULT 0,  -- never uploaded: the backlog outgrew its bound
        summaries_ms INTEGER                 -- rollup_cursor.until_ms when summaries were last uploaded
    );
    """,
    """
    -- Alerts (analysis/alerts.py): the outages `tunnelwatch outages --by target` lists, as the
    -- daemon found them round by round, and what has been said about each.
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        target TEXT NOT NULL,                -- a target, or '*' for the path (degradation)
        grp TEXT NOT NULL,                   -- the target's group, '' for the path
        verdict TEXT NOT NULL,
        rules TEXT NOT NULL,                 -- JSON list of rule ids
        blocking TEXT NOT NULL DEFAULT '',
        failure TEXT NOT NULL DEFAULT '',    -- the failure string of its last failing round
        detail TEXT NOT NULL DEFAULT '',
        start_ms INTEGER NOT NULL,           -- the outage's start
        end_ms INTEGER,                      -- its end; NULL while it is open
        announced TEXT NOT NULL DEFAULT '',  -- '' (held back or filtered), 'down', 'back'
        announced_verdict TEXT NOT NULL DEFAULT '',
        updated_ms INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX alerts_open ON alerts (path, target) WHERE end_ms IS NULL;
    CREATE INDEX alerts_start ON alerts (start_ms);
    CREATE TABLE alerts_cursor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        evaluated_ms INTEGER NOT NULL        -- the rounds up to here have been judged
    );
    -- One message to one destination (a hash of its URL: the URL may hold a secret); sent or
    -- retried with back-off by the daemon (probe/daemon/notifier.py).
    CREATE TABLE notifications (
        id INTEGER PRIMARY KEY,
        created_ms INTEGER NOT NULL,
        destination TEXT NOT NULL,
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_try_ms INTEGER NOT NULL,
        sent_ms INTEGER,
        error TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX notifications_due ON notifications (next_try_ms) WHERE sent_ms IS NULL;
    """,
)


class Store(Protocol):
    def write(self, measurements: Sequence[Measurement], heartbeats: Sequence[Heartbeat] = ()) -> None: ...

    def record_paths(self, paths: Sequence[tuple[str, str, str, str | None]]) -> None: ...

    def verify(self) -> None: ...

    def reopen(self) -> str: ...

    def measurements(self, round_id: str | None = None) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def _measurement_row(m: Measurement) -> tuple[Any, ...]:
    return (
        m.vantage,
        m.round_id,
        m.target,
        m.group,
        m.path,
        m.kind,
        m.input,
        to_ms(m.started_at),
        int(m.ok),
        m.failure,
        m.failed_operation,
        m.resolve_ms,
        m.proxy_ms,
        m.connect_ms,
        m.tls_ms,
        m.first_byte_ms,
        m.total_ms,
        m.resolver,
        m.dns_rcode,
        json.dumps(list(m.addresses)),
        m.peer_address,
        m.status,
        m.final_url,
        m.body_length,
        m.body_sha256,
        m.title,
        m.tls_version,
        m.cert_subject,
        m.cert_issuer,
        to_ms(m.cert_not_after),
        None if m.tls_verified is None else int(m.tls_verified),
        m.detail,
        m.loop_lag_ms,
    )


def _heartbeat_row(h: Heartbeat) -> tuple[Any, ...]:
    return (
        h.round_id,
        h.vantage,
        to_ms(h.started_at),
        to_ms(h.finished_at),
        h.probes,
        h.succeeded,
        h.config_sha256,
        h.target,
        to_ms(h.scheduled_at),
    )


def _insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


PathRow = tuple[str, str, str, str | None]
COMPANIONS = ("-wal", "-shm")  # SQLite's files beside the store in WAL mode


class SQLiteStore:
    """SQLite in WAL mode. Use from one thread at a time: it is the single writer.

    With `lock` (the daemon's StoreLock) the store is the daemon's: a damaged file is not
    refused at open but raises StoreLost at the first write, nothing is written to a file
    before `verify()` checked it, and `reopen()` takes the lock again if it went with the
    store."""

    def __init__(self, path: Path, busy_timeout_s: float = 5.0, lock: StoreLock | None = None) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._lock = lock
        self._paths: list[PathRow] = []
        self._paths_due = False  # recorded, not written yet
        self._checked = lock is None
        self._lost: StoreLost | None = None
        self._identity: dict[str, tuple[int, int] | None] = {}  # of the store's file and its companions
        self._db: sqlite3.Connection | None = None
        try:
            self._db = self._open()
        except StoreDamaged as exc:
            if lock is None:
                raise
            self._lost = exc  # the daemon moves it aside: reopen()

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, check_same_thread=False, isolation_level=None)
            self._identity = {"": identity(self.path)}
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the store: {exc}") from None
        try:
            db.execute("PRAGMA cell_size_check = ON")  # damage is found when its page is read, not spread
            if (problem := look_over(db)) is not None:
                raise StoreDamaged(self.path, problem)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            migrate(
                str(self.path),
                db.execute("PRAGMA user_version").fetchone()[0],
                MIGRATIONS,
                lambda number, script: db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;"),
            )
            self._identity.update({suffix: identity(f"{self.path}{suffix}") for suffix in COMPANIONS})
        except sqlite3.Error as exc:
            db.close()
            raise store_error(self.path, exc, "open the store") from None
        except StoreError:
            db.close()
            raise
        return db

    @property
    def schema_version(self) -> int:
        return int(self._read("PRAGMA user_version")[0][0])

    def _writable(self) -> sqlite3.Connection:
        """The connection, once the file at the path is known to be still the one it has open
        (a stat: microseconds)."""
        if self._lost is None:
            try:
                now = identity(self.path)
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot look at the store file: {exc}") from None
            if now is None:
                self._lost = StoreLost(self.path, "deleted", "the store file was deleted while tunnelwatch had it open")
            elif now != self._identity[""]:
                self._lost = StoreLost(
                    self.path, "replaced", "the store file was replaced by another while tunnelwatch had it open"
                )
        if self._lost is not None or self._db is None:
            raise self._lost or StoreError(f"{self.path}: the store is closed")
        return self._db

    def _failed(self, exc: sqlite3.Error, doing: str) -> StoreError:
        if self._db is not None and self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
        error = store_error(self.path, exc, doing)
        if isinstance(error, StoreLost):
            self._lost = error
        return error

    def write(self, measurements: Sequence[Measurement], heartbeats: Sequence[Heartbeat] = ()) -> None:
        """One transaction: the whole batch lands, or none of it does. StoreLost when the file
        is not the store any more, seen before the batch or after it: a batch committed into a
        file deleted meanwhile went with it, and is to be written again after `reopen()`."""
        db = self._writable()
        try:
            db.execute("BEGIN IMMEDIATE")
            if self._paths_due:
                self._upsert_paths(db)
            db.executemany(_insert("measurements", MEASUREMENT_COLUMNS), map(_measurement_row, measurements))
            db.executemany(_insert("heartbeats", HEARTBEAT_COLUMNS), map(_heartbeat_row, heartbeats))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._failed(exc, f"write {len(measurements)} measurements") from exc
        self._paths_due = False
        self._writable()

    def record_paths(self, paths: Sequence[PathRow]) -> None:
        """What each path is (name, kind, label, endpoint target), so analysis knows which
        path is direct and which are tunnels without the config that measured them. Kept:
        a store not written yet (the daemon's, before `verify()`) or lost writes them with
        its next batch, or when reopened; StoreLost is left to that next write."""
        self._paths, self._paths_due = list(paths), True
        if not self._checked or self._lost is not None:
            return
        try:
            db = self._writable()
        except StoreLost:
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            self._upsert_paths(db)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            error = self._failed(exc, "record the paths")
            if isinstance(error, StoreLost):
                return
            raise error from exc
        self._paths_due = False

    def _upsert_paths(self, db: sqlite3.Connection) -> None:
        db.executemany(
            f"{_insert('paths', PATH_COLUMNS)} ON CONFLICT (name) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in PATH_COLUMNS if c != "name"),
            self._paths,
        )

    def verify(self) -> None:
        """The full check, PRAGMA quick_check of every page: some 10 s for a GB, so the
        daemon's writer runs it in a thread before its first write, rounds waiting in its
        buffer. StoreDamaged (and the store lost) when it finds damage."""
        db = self._writable()
        try:
            found = quick_check(db, "3")
        except sqlite3.Error as exc:
            raise self._failed(exc, "check the store") from None
        if found != "ok":
            self._lost = StoreDamaged(self.path, found)
            raise self._lost
        self._checked = True
        if self._paths_due:
            self.record_paths(self._paths)

    def reopen(self) -> str:
        """After StoreLost: a store at the path again, to be verified before it is written;
        returns what was done, for the log. The lock is taken again first if it went with
        the store, so no second daemon starts on the path; a damaged file is moved aside with
        its WAL; SQLite's files left of a deleted one are removed, never read into the new."""
        try:
            return self._reopen()
        except OSError as exc:  # the directory gone or unwritable, the lock file not to be made
            raise StoreError(f"{self.path}: cannot open a store there again: {exc.strerror or exc}") from None

    def _reopen(self) -> str:
        lost = self._lost
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()  # SQLite checkpoints into the file it has open, deleted or not
            self._db = None
        if self._lock is not None:
            self._lock.follow()
        now = identity(self.path)
        if lost is not None and lost.reason == "damaged" and now is not None and now == self._identity[""]:
            done = f"moved it aside to {self._move_aside()} and started a fresh store"
        else:
            for suffix in COMPANIONS:
                if (ours := self._identity.get(suffix)) is not None and identity(f"{self.path}{suffix}") == ours:
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            done = "started a fresh store" if now is None else "opened the file now there"
        try:
            self._db = self._open()
        except StoreDamaged as exc:
            self._lost = exc  # the file now there is damaged too: the next reopen moves it aside
            raise
        self._lost, self._checked, self._paths_due = None, False, bool(self._paths)
        return done

    def _move_aside(self) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        for n in itertools.count(2):
            if not aside.exists():
                break
            aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}")
        try:
            for suffix in ("", *COMPANIONS):
                if Path(f"{self.path}{suffix}").exists():
                    Path(f"{self.path}{suffix}").rename(f"{aside}{suffix}")
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot move the damaged store aside: {exc}") from None
        return aside

    def _read(self, query: str, args: Sequence[Any] = ()) -> list[Any]:
        if self._db is None:
            raise self._lost or StoreError(f"{self.path}: the store is closed")
        try:
            return self._db.execute(query, args).fetchall()
        except sqlite3.Error as exc:
            raise store_error(self.path, exc, "read the store") from None

    def measurements(self, round_id: str | None = None) -> list[dict[str, Any]]:
        query = f"SELECT {', '.join(MEASUREMENT_COLUMNS)} FROM measurements"
        args: tuple[Any, ...] = ()
        if round_id:
            query, args = query + " WHERE round_id = ?", (round_id,)
        out = []
        for row in self._read(query + " ORDER BY id", args):
            record = dict(zip(MEASUREMENT_COLUMNS, row, strict=True))
            record["addresses"] = json.loads(record["addresses"])
            record["started_at"] = from_ms(record.pop("started_at_ms"))
            out.append(record)
        return out

    def heartbeats(self) -> list[dict[str, Any]]:
        rows = self._read(f"SELECT {', '.join(HEARTBEAT_COLUMNS)} FROM heartbeats ORDER BY started_at_ms")
        return [dict(zip(HEARTBEAT_COLUMNS, row, strict=True)) for row in rows]

    def integrity_check(self) -> str:
        return str(self._read("PRAGMA integrity_check")[0][0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def open_store(path: Path, lock: StoreLock | None = None) -> SQLiteStore:
    return SQLiteStore(path, lock=lock)


def writable(path: Path, timeout_s: float = 30) -> sqlite3.Connection:
    """A connection to write a store beside its daemon (compaction, alerts, imports), in
    autocommit mode for explicit transactions; the schema created or migrated first, and a
    damaged store refused."""
    SQLiteStore(path).close()
    try:
        conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
        conn.execute("PRAGMA cell_size_check = ON")
    except sqlite3.Error as exc:
        raise store_error(path, exc, "open the store") from None
    return conn
