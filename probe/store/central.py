"""The fleet's central store: PostgreSQL, written by every vantage point's forwarder.

The tables mean what the SQLite store's do, with the same columns (probe/store/schema.py;
times as Unix milliseconds), so analysis reads both with the same SQL; rows carry their
vantage point. Measurements and heartbeats are partitioned by month of `started_at_ms`
(dropping a month is how retention works), and a row's natural key makes an upload
idempotent: a batch sent twice, after a forwarder died between the commit and noting it, is
stored once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg

from probe.errors import StoreError
from probe.pgurl import mask, postgres_url_problem, redact
from probe.store.schema import (
    HEARTBEAT_COLUMNS,
    LATENCY_VALUES,
    MEASUREMENT_COLUMNS,
    PATH_COLUMNS,
    ROLLUP_CURSOR_COLUMNS,
    SUMMARY_TABLES,
    from_ms,
    migrate,
    to_ms,
)

CONNECT_TIMEOUT_S = 5
TCP_USER_TIMEOUT_MS = 30_000
PARTITIONED = ("measurements", "heartbeats")
KEYS = {
    "measurements": ("vantage", "round_id", "target", "path", "started_at_ms"),
    "heartbeats": ("vantage", "round_id", "started_at_ms"),
}
_TEXT, _INT, _REAL = "text", "bigint", "double precision"
TYPES = {
    **dict.fromkeys(MEASUREMENT_COLUMNS + HEARTBEAT_COLUMNS, _TEXT),
    **dict.fromkeys(
        (
            "started_at_ms",
            "ok",
            "status",
            "body_length",
            "cert_not_after_ms",
            "tls_verified",
            "finished_at_ms",
            "probes",
            "succeeded",
            "scheduled_at_ms",
        ),
        _INT,
    ),
    **dict.fromkeys(
        ("resolve_ms", "proxy_ms", "connect_ms", "tls_ms", "first_byte_ms", "total_ms", "loop_lag_ms"), _REAL
    ),
}
NOT_NULL = {
    "measurements": frozenset(
        {"vantage", "round_id", "target", "grp", "path", "kind", "input", "started_at_ms", "ok", "addresses", "detail"}
    ),
    "heartbeats": frozenset(
        {"vantage", "round_id", "started_at_ms", "finished_at_ms", "probes", "succeeded", "config_sha256"}
    ),
}


def _table(name: str, columns: Sequence[str]) -> str:
    body = ", ".join(f"{c} {TYPES[c]}{' NOT NULL' if c in NOT_NULL[name] else ''}" for c in columns)
    return f"CREATE TABLE {name} ({body}, PRIMARY KEY ({', '.join(KEYS[name])})) PARTITION BY RANGE (started_at_ms);"


# Each entry moves the schema from version i to i + 1. Never edit a shipped entry: append.
MIGRATIONS = (
    _table("measurements", MEASUREMENT_COLUMNS)
    + _table("heartbeats", HEARTBEAT_COLUMNS)
    + """
    -- What analysis asks: one vantage point's rows of a time range.
    CREATE INDEX measurements_vantage_time ON measurements (vantage, started_at_ms);
    CREATE INDEX heartbeats_vantage_time ON heartbeats (vantage, started_at_ms);
    CREATE TABLE paths (
        vantage text NOT NULL,
        name text NOT NULL,
        kind text NOT NULL,
        label text NOT NULL DEFAULT '',
        endpoint_target text,
        PRIMARY KEY (vantage, name)
    );
    -- Each vantage point's summaries, as its compaction wrote them (analysis/rollup.py).
    CREATE TABLE rollup_cursor (
        vantage text PRIMARY KEY,
        until_ms bigint NOT NULL,
        slot_s double precision NOT NULL
    );
    CREATE TABLE verdict_runs (
        vantage text NOT NULL,
        id bigint NOT NULL,                  -- the run's id in the vantage point's store
        target text NOT NULL, path text NOT NULL, state text NOT NULL, verdict text NOT NULL,
        rule text NOT NULL, blocking text NOT NULL, detail text NOT NULL,
        first_ms bigint NOT NULL, last_ms bigint NOT NULL, rounds bigint NOT NULL,
        PRIMARY KEY (vantage, id)
    );
    CREATE INDEX verdict_runs_last ON verdict_runs (vantage, last_ms);
    CREATE TABLE hourly (
        vantage text NOT NULL, hour_ms bigint NOT NULL, grp text NOT NULL, path text NOT NULL,
        probes bigint NOT NULL, failing bigint NOT NULL,
        PRIMARY KEY (vantage, hour_ms, grp, path)
    );
    CREATE TABLE hourly_latency (
        vantage text NOT NULL, hour_ms bigint NOT NULL, path text NOT NULL, samples bigint NOT NULL,
    """
    + ", ".join(f"{c} double precision" for c in LATENCY_VALUES)
    + """,
        PRIMARY KEY (vantage, hour_ms, path)
    );
    CREATE TABLE coverage (
        vantage text NOT NULL, start_ms bigint NOT NULL, end_ms bigint NOT NULL,
        PRIMARY KEY (vantage, start_ms)
    );
    """,
)


def month_bounds(ms: int) -> tuple[int, int, str]:
    """The month holding `ms`: its start and end (Unix ms) and a partition suffix."""
    moment = from_ms(ms)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return to_ms(start), to_ms(end), f"y{moment:%Ym%m}"


class CentralStore:
    """One connection to the central PostgreSQL; every method is one transaction."""

    def __init__(self, url: str, conninfo: str | None = None) -> None:
        """`conninfo`, when given, is how to reach `url` (through the uplink's relay)."""
        self.url = url
        if problem := postgres_url_problem(url):  # libpq would quote pieces of its password
            raise StoreError(f"{redact(url)}: cannot open the central store: its URL {problem}")
        try:
            # A censor may blackhole the uplink: bound every wait on it, not only the connect.
            self._db = psycopg.connect(
                conninfo or url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                tcp_user_timeout=TCP_USER_TIMEOUT_MS,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
            try:
                self._migrate()
            except (psycopg.Error, StoreError):  # the server gone, or a schema newer than this tunnelwatch knows
                self._db.close()
                raise
        except psycopg.Error as exc:
            raise StoreError(f"{redact(url)}: cannot open the central store: {_first_line(exc, url)}") from None
        self._months: set[str] = set()  # partitions known to exist

    def _migrate(self) -> None:
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(7477)")  # two forwarders starting at once
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if row is None:
                self._db.execute("INSERT INTO schema_version VALUES (0)")
            migrate(redact(self.url), version, MIGRATIONS, self._apply)

    def _apply(self, number: int, script: str) -> None:
        """One migration, in the transaction `_migrate` holds."""
        self._db.execute(script)
        self._db.execute("UPDATE schema_version SET version = %s", [number])

    def ingest(
        self,
        vantage: str,
        measurements: Sequence[tuple[Any, ...]],
        heartbeats: Sequence[tuple[Any, ...]],
        paths: Sequence[tuple[Any, ...]] = (),
    ) -> int:
        """Rows as the SQLite store holds them (MEASUREMENT_COLUMNS, HEARTBEAT_COLUMNS), all
        in one transaction; rows already stored are skipped. Returns the measurements added."""
        try:
            with self._db.transaction():
                months = self._partitions(
                    [row[MEASUREMENT_COLUMNS.index("started_at_ms")] for row in measurements]
                    + [row[HEARTBEAT_COLUMNS.index("started_at_ms")] for row in heartbeats]
                )
                added = self._copy("measurements", MEASUREMENT_COLUMNS, measurements)
                self._copy("heartbeats", HEARTBEAT_COLUMNS, heartbeats)
                self._copy(
                    "paths", ("vantage", *PATH_COLUMNS), [(vantage, *p) for p in paths], update=("vantage", "name")
                )
        except psycopg.Error as exc:
            raise StoreError(
                f"{redact(self.url)}: cannot store {len(measurements)} measurements: {_first_line(exc, self.url)}"
            ) from None
        self._months |= months
        return added

    def replace_summaries(
        self, vantage: str, since_ms: int, tables: Mapping[str, Sequence[tuple[Any, ...]]], cursor: tuple[int, float]
    ) -> None:
        """A vantage point's summary rows recent as of `since_ms`, replacing those stored, and
        its cursor (until_ms, slot_s), in one transaction: sent twice, stored once."""
        try:
            with self._db.transaction():
                for table in SUMMARY_TABLES:
                    self._db.execute(
                        f"DELETE FROM {table.name} WHERE vantage = %s AND {table.recent} >= %s", [vantage, since_ms]
                    )
                    self._copy(
                        table.name,
                        ("vantage", *table.columns),
                        [(vantage, *row) for row in tables[table.name]],
                        update=("vantage", *table.key),
                    )
                self._copy(
                    "rollup_cursor", ("vantage", *ROLLUP_CURSOR_COLUMNS), [(vantage, *cursor)], update=("vantage",)
                )
        except psycopg.Error as exc:
            raise StoreError(
                f"{redact(self.url)}: cannot store the summaries of {vantage}: {_first_line(exc, self.url)}"
            ) from None

    def _partitions(self, times: Sequence[int]) -> set[str]:
        """The monthly partitions these rows need, created if missing; their names."""
        months = {month_bounds(ms) for ms in times}
        if all(suffix in self._months for _, _, suffix in months):
            return set()
        self._db.execute("SELECT pg_advisory_xact_lock(7478)")  # forwarders adding the same month
        for start, end, suffix in sorted(months):
            for table in PARTITIONED:
                self._db.execute(
                    f"CREATE TABLE IF NOT EXISTS {table}_{suffix} PARTITION OF {table} "
                    f"FOR VALUES FROM ({start}) TO ({end})"
                )
        return {suffix for _, _, suffix in months}

    def _copy(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]], update: Sequence[str] = ()
    ) -> int:
        """COPY into a scratch table, then insert what is new (or, with `update`, the key,
        overwrite what is there): fast and idempotent."""
        if not rows:
            return 0
        names = ", ".join(columns)
        self._db.execute(f"CREATE TEMP TABLE IF NOT EXISTS incoming_{table} (LIKE {table}) ON COMMIT DELETE ROWS")
        with self._db.cursor().copy(f"COPY incoming_{table} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        conflict = "DO NOTHING"
        if update:
            conflict = f"({', '.join(update)}) DO UPDATE SET " + ", ".join(
                f"{c} = excluded.{c}" for c in columns if c not in update
            )
        cursor = self._db.execute(
            f"INSERT INTO {table} ({names}) SELECT {names} FROM incoming_{table} ON CONFLICT {conflict}"
        )
        return cursor.rowcount

    def drop_months(self, before_ms: int) -> tuple[list[str], int | None]:
        """Drop the monthly partitions of raw rows that end before `before_ms` and that every
        vantage point's summaries cover (its rollup cursor is past them): analysis answers
        from the summaries there. The partitions dropped, and how far summaries cover."""
        try:
            with self._db.transaction():
                (covered,) = self._db.execute(
                    "SELECT min(coalesce(c.until_ms, -1)) FROM (SELECT DISTINCT vantage FROM paths) v "
                    "LEFT JOIN rollup_cursor c USING (vantage)"
                ).fetchone()  # type: ignore[misc]
                limit = min(before_ms, covered if covered is not None else -1)
                dropped = []
                for table in PARTITIONED:
                    for (name,) in self._db.execute(
                        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                        "WHERE i.inhparent = %s::regclass ORDER BY 1",
                        [table],
                    ).fetchall():
                        year, month = int(name[-7:-3]), int(name[-2:])
                        _, end, _ = month_bounds(to_ms(datetime(year, month, 1, tzinfo=UTC)))
                        if end <= limit:
                            self._db.execute(f"DROP TABLE {name}")
                            dropped.append(name)
        except psycopg.Error as exc:
            raise StoreError(f"{redact(self.url)}: cannot drop old months: {_first_line(exc, self.url)}") from None
        self._months.clear()
        return sorted(dropped), covered if covered is not None and covered >= 0 else None

    def count(self, table: str = "measurements", vantage: str | None = None) -> int:
        where, args = ("WHERE vantage = %s", [vantage]) if vantage else ("", [])
        row = self._db.execute(f"SELECT count(*) FROM {table} {where}", args).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> CentralStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _first_line(exc: Exception, url: str) -> str:
    """The driver's message, without the URL's password."""
    return mask((str(exc).strip().splitlines() or [type(exc).__name__])[0], url)
