"""The tables as every side knows them: the columns of the stored rows, the summary tables
the fleet uploads, times as Unix milliseconds, and the loop that migrates a schema.

The SQLite store (probe/store/sqlite.py), the central PostgreSQL (probe/store/central.py),
the forwarder (probe/fleet/forwarder.py) and analysis read and write these tables by these
lists, so a column added to a table is added here once. Each store's `MIGRATIONS` create
the tables; tests/test_store.py checks they and these lists agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import overload

from probe.errors import StoreError

# A row of `measurements`, every column but its id, in the order the SQLite store writes it
# and the forwarder uploads it.
MEASUREMENT_COLUMNS = (
    "vantage",
    "round_id",
    "target",
    "grp",
    "path",
    "kind",
    "input",
    "started_at_ms",
    "ok",
    "failure",
    "failed_operation",
    "resolve_ms",
    "proxy_ms",
    "connect_ms",
    "tls_ms",
    "first_byte_ms",
    "total_ms",
    "resolver",
    "dns_rcode",
    "addresses",
    "peer_address",
    "status",
    "final_url",
    "body_length",
    "body_sha256",
    "title",
    "tls_version",
    "cert_subject",
    "cert_issuer",
    "cert_not_after_ms",
    "tls_verified",
    "detail",
    "loop_lag_ms",
)
# A row of `heartbeats`, likewise.
HEARTBEAT_COLUMNS = (
    "round_id",
    "vantage",
    "started_at_ms",
    "finished_at_ms",
    "probes",
    "succeeded",
    "config_sha256",
    "target",
    "scheduled_at_ms",
)
# A row of `paths`: what each path is (a vantage point's own store; the central one adds `vantage`).
PATH_COLUMNS = ("name", "kind", "label", "endpoint_target")

# What a verdict is; a verdict run is consecutive rounds of a (target, path) equal in these.
VERDICT_COLUMNS = ("state", "verdict", "rule", "blocking", "detail")
LATENCY_METRICS = ("connect", "first_byte", "total")  # of `<metric>_ms`; total: the whole fetch
LATENCY_PERCENTILES = (10, 25, 50, 75, 90)
# hourly_latency's percentile columns: connect_p10 ... total_p90.
LATENCY_VALUES = tuple(f"{metric}_p{p}" for metric in LATENCY_METRICS for p in LATENCY_PERCENTILES)
# rollup_cursor's row: summaries hold the rounds that started before until_ms, judged at slot_s.
ROLLUP_CURSOR_COLUMNS = ("until_ms", "slot_s")


@dataclass(frozen=True, slots=True)
class SummaryTable:
    """A table compaction writes (analysis/compaction.py), as a vantage point's store holds it;
    the central store adds `vantage` to its columns and to its key."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    recent: str  # the column that says how recent a row is: what the forwarder sends again


VERDICT_RUNS = SummaryTable(
    "verdict_runs",
    ("id", "target", "path", *VERDICT_COLUMNS, "first_ms", "last_ms", "rounds"),
    ("id",),
    "last_ms",
)
HOURLY = SummaryTable("hourly", ("hour_ms", "grp", "path", "probes", "failing"), ("hour_ms", "grp", "path"), "hour_ms")
HOURLY_LATENCY = SummaryTable(
    "hourly_latency", ("hour_ms", "path", "samples", *LATENCY_VALUES), ("hour_ms", "path"), "hour_ms"
)
COVERAGE = SummaryTable("coverage", ("start_ms", "end_ms"), ("start_ms",), "end_ms")
SUMMARY_TABLES = (VERDICT_RUNS, HOURLY, HOURLY_LATENCY, COVERAGE)


@overload
def to_ms(moment: datetime) -> int: ...


@overload
def to_ms(moment: None) -> None: ...


def to_ms(moment: datetime | None) -> int | None:
    """An aware datetime (or a pandas Timestamp) as the tables store times: Unix ms."""
    return None if moment is None else round(moment.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    """A stored time as a UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, UTC)


def migrate(where: str, version: int, migrations: Sequence[str], apply: Callable[[int, str], object]) -> None:
    """Bring a store at schema `version` up to date: `apply(number, script)` runs each script
    after that version and notes `number` as the new one, together. A store whose version is
    newer than `migrations` know is refused (StoreError, naming `where`)."""
    if version > len(migrations):
        raise StoreError(
            f"{where}: schema version {version} is newer than this tunnelwatch knows ({len(migrations)}); "
            "upgrade tunnelwatch"
        )
    for number, script in enumerate(migrations[version:], start=version + 1):
        apply(number, script)
