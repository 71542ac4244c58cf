"""The fleet's central PostgreSQL: ingest from VANTAGES vantage points at once.

Builds one spool of DAYS days (100 targets x 4 paths at 5-minute rounds, bench/synth.py,
not compacted: every raw row goes up), copies it for each vantage point (renamed), starts a
throwaway cluster (Debian's postgresql, as in the tests) and runs one forwarder process per
vantage point (probe/fleet/forwarder.py, batches of store.forward_batch), all at once. Reports the
measurements stored per second over all of them and the central table size per measurement.
The analysis commands against PostgreSQL are timed with the synthetic year
(bench/analysis_load.py).

Usage: .venv/bin/python bench/fleet_load.py [--days 2] [--vantages 10]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.synth import build  # noqa: E402
from probe.config import StoreSettings  # noqa: E402
from tests.postgres import cluster  # noqa: E402

START = datetime(2018, 3, 1, tzinfo=UTC)
BATCH = StoreSettings().forward_batch


def rename(spool: Path, vantage: str) -> None:
    with sqlite3.connect(spool) as db:
        for table in ("measurements", "heartbeats"):
            db.execute(f"UPDATE {table} SET vantage = ?", [vantage])


def _forward(spool: Path, url: str, vantage: str) -> int:
    from probe.fleet.forwarder import Forwarder

    forwarder = Forwarder(spool, url, vantage, BATCH, 100_000_000)
    try:
        return forwarder.forward()
    finally:
        forwarder.close()


def forward_all(url: str, spools: dict[str, Path]) -> tuple[int, float]:
    """Every spool forwarded by its own process at once: (measurements stored, seconds)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(len(spools)) as pool:
        started = time.perf_counter()
        sent = pool.starmap(_forward, [(spool, url, name) for name, spool in spools.items()])
        return sum(sent), time.perf_counter() - started


def measure_fleet(days: int, vantages: int) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="tw-fleet-bench-"))
    try:
        one = tmp / "spool.db"
        rows = build(one, days, 100, START)
        spools = {}
        for i in range(vantages):
            name = f"vantage-{i:02d}"
            spools[name] = tmp / f"{name}.db"
            shutil.copy(one, spools[name])
            rename(spools[name], name)
        with cluster(fsync=True) as server:
            url = server.database("fleet")
            import psycopg

            from probe.store.central import CentralStore

            CentralStore(url).close()  # the schema, before the clock starts
            sent, seconds = forward_all(url, spools)
            with psycopg.connect(url) as conn:
                (stored,) = conn.execute("SELECT count(*) FROM measurements").fetchone()  # type: ignore[misc]
                (size,) = conn.execute(  # bytes, as numeric
                    "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits "
                    "WHERE inhparent = 'measurements'::regclass"
                ).fetchone()  # type: ignore[misc]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = int(size or 0)
    return f"""{vantages} vantage points, each a spool of {days} days of 100 targets x 4 paths at
5-minute rounds ({rows:,} measurements each, bench/synth.py, rows as the daemon fills them for
an https page), forwarded into one PostgreSQL on loopback (default settings, fsync on) by one
forwarder process each, all at once, in batches of {BATCH:,} (`store.forward_batch`):
COPY into a scratch table, then an insert of the rows whose key is new.

| | |
|---|---|
| measurements stored | {stored:,} of {sent:,} sent ({vantages} x {rows:,}) |
| ingest, all vantage points together | {sent / seconds:,.0f} measurements/s ({seconds:.1f} s) |
| central `measurements`, indexes included | {size / 1e6:,.0f} MB: {size / max(stored, 1):.0f} bytes per measurement (raw rows, kept until retired; the year above shows the summaries in use) |

A vantage point at 100 targets x 4 paths every 5 minutes makes 1.3 measurements a second.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--vantages", type=int, default=10)
    args = parser.parse_args()
    print(measure_fleet(args.days, args.vantages))


if __name__ == "__main__":
    main()
