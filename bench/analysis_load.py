"""Analysis commands on synthetic stores: `outages`, `events check`, `chart weekly` and
`report weekly`, timed as a user runs them (wall time and peak RSS of the command).

Builds stores of DAYS days (100 targets x 4 paths, 5-minute rounds; see bench/synth.py),
written and compacted as the daemon does (raw rows for the last 31 days, summaries before),
runs each command RUNS times and reports the median. Targets from the issues: over a year,
`outages` and `events check` under 10 s and 2 GB; the weekly chart and report under 3 s.
The weekly commands run on an old week and on the last full week (its raw rows still kept);
like the daemon, the build compacts as it goes, so both are read from summaries.

Also the store's size: bytes on disk per measurement, raw rows against summaries.

With --store, an existing store built so (bench/synth.py STORE.db --days 365 --start
2018-03-01 --compact) is timed instead of a new one: its build is not measured again.

Usage: .venv/bin/python bench/analysis_load.py [--days 365] [--runs 3] [--store STORE.db]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.synth import build  # noqa: E402
from probe.config import StoreSettings  # noqa: E402

TUNNELWATCH = str(ROOT / ".venv" / "bin" / "tunnelwatch")
START = datetime(2018, 3, 1, tzinfo=UTC)
KEEP_RAW_DAYS = StoreSettings().keep_raw_days


def commands(days: int) -> list[list[str]]:
    last = (START + timedelta(days=days - 7)).isocalendar()
    recent = f"{last.year}-W{last.week:02d}"
    weeks = ["2018-W10"] + ([recent] if recent != "2018-W10" else [])
    return [
        ["outages", "--format", "csv"],
        ["events", "check", "--category", "npc", "--format", "csv"],
        *(["chart", "weekly", "--week", w] for w in weeks),
        *(["report", "weekly", "--week", w] for w in weeks),
    ]


MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, code)
"""


def config(tmp: Path, db: Path) -> Path:
    path = tmp / f"{db.stem}.toml"
    path.write_text(
        f'[vantage]\nname = "bench"\n[store]\npath = "{db}"\n[report]\ndirectory = "{tmp / "reports"}"\n'
        '[[targets]]\nname = "t000"\ngroup = "blocked"\nkind = "http"\nurl = "https://t000.example/"\n'
        '[[paths]]\nname = "direct"\nkind = "direct"\n'
    )
    return path


def run(command: list[str], cfg: Path, cwd: Path) -> tuple[float, float, int]:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, TUNNELWATCH, *command, "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    seconds, rss, code = result.stdout.split()
    return float(seconds), float(rss), int(code)


def _sizes(db: Path) -> dict[str, int]:
    """Bytes on disk per table (indexes included) and free pages, from SQLite's dbstat."""
    conn = sqlite3.connect(db)
    try:
        owner = dict(conn.execute("SELECT name, tbl_name FROM sqlite_schema WHERE type IN ('table', 'index')"))
        sizes: dict[str, int] = {}
        for name, size in conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            table = owner.get(name, name)
            sizes[table] = sizes.get(table, 0) + size
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        sizes["(free pages)"] = conn.execute("PRAGMA freelist_count").fetchone()[0] * page
    finally:
        conn.close()
    return sizes


def _timed(command: list[str], cfg: Path, cwd: Path, runs: int) -> str:
    samples = [run(command, cfg, cwd) for _ in range(runs)]
    failed = [code for _, _, code in samples if code != 0]
    wall = statistics.median(s for s, _, _ in samples)
    rss = max(r for _, r, _ in samples)
    return f"| `tunnelwatch {' '.join(command)}` | {wall:.1f} s | {rss:,.0f} MB | {'exit ' + str(failed[0]) if failed else 'ok'} |"


def _central(db: Path, cfg: Path, tmp: Path, days: int, runs: int) -> tuple[list[str], float]:
    """The store forwarded to PostgreSQL as a vantage point's forwarder would (its raw rows
    and summaries), and the same commands against it; and the upload's duration."""
    from probe.fleet.forwarder import Forwarder
    from tests.postgres import cluster

    spool = tmp / "spool.db"  # the forwarder notes its progress in the store: a copy's (a --store is kept as it is)
    shutil.copyfile(db, spool)
    with cluster(fsync=True) as server:
        url = server.database("year")
        started = time.perf_counter()
        forwarder = Forwarder(spool, url, "bench", StoreSettings().forward_batch, 100_000_000)
        forwarder.forward()
        forwarder.close()
        uploaded = time.perf_counter() - started
        lines = [_timed([*command, "--store", url, "--vantage", "bench"], cfg, tmp, runs) for command in commands(days)]
    return [line.replace(url, "postgresql://...") for line in lines], uploaded


def measure_year(days: int, runs: int, store: Path | None = None) -> str:
    """Build the store as the daemon would have written it (or take `store`, built so), then
    time the commands on it, then on the fleet's PostgreSQL holding the same."""
    tmp = Path(tempfile.mkdtemp(prefix="tw-analysis-bench-"))
    db = store or tmp / f"store-{days}d.db"
    started = time.perf_counter()
    rows = build(db, days, 100, START, keep_raw_days=KEEP_RAW_DAYS) if store is None else 0
    built = time.perf_counter() - started
    cfg = config(tmp, db)
    lines = [_timed(command, cfg, tmp, runs) for command in commands(days)]
    central, uploaded = _central(db, cfg, tmp, days, runs)
    sizes = _sizes(db)
    total = db.stat().st_size
    raw = sizes.get("measurements", 0) + sizes.get("heartbeats", 0)
    summaries = sum(v for k, v in sizes.items() if k in ("verdict_runs", "hourly", "hourly_latency", "coverage"))
    with sqlite3.connect(db) as conn:
        kept = conn.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
    shutil.rmtree(tmp, ignore_errors=True)
    made = (
        f"| measurements written | {rows:,} |\n| written and compacted in | {built:.0f} s ({rows / built:,.0f} measurements/s) |\n"
        if rows
        else f"| measurements | {kept:,} raw rows kept; the store built beforehand (--store) |\n"
    )
    per = f": **{total / rows:.1f} bytes per measurement**, amortised (target: at most 25)" if rows else ""
    return f"""Stores from bench/synth.py: {days} days of 100 targets x 4 paths at 5-minute rounds from
2018-03-01 (a tunnel crackdown from the NPC opening, a third of the targets blocked directly, a
daemon gap, 0.5 % noise), rows filled as the daemon fills them for an https page, written
through the store's insert statement a day at a time and compacted after each day as the
daemon does every hour, raw rows kept {KEEP_RAW_DAYS:g} days (`store.keep_raw_days`, the default).
Commands: median of {runs} runs; peak RSS is the largest.

| store | value |
|---|---|
{made}| file size | {total / 1e6:,.0f} MB{per} |
| raw rows kept ({KEEP_RAW_DAYS:g} days) | {kept:,} measurements and their heartbeats: {raw / 1e6:,.0f} MB ({raw / max(kept, 1):.0f} bytes each) |
| summaries of the whole year | {summaries / 1e6:,.1f} MB |
| free pages (deleted rows, reused by new ones) | {sizes["(free pages)"] / 1e6:,.0f} MB |

| command | wall time | peak RSS | |
|---|---|---|---|
{chr(10).join(lines)}

The same store forwarded to PostgreSQL (a throwaway cluster on loopback, fsync on) as a
vantage point's forwarder uploads it (its {KEEP_RAW_DAYS:g} days of raw rows and the year's summaries; {uploaded:.0f} s),
and the same commands against it (`--store postgresql://... --vantage bench`):

| command | wall time | peak RSS | |
|---|---|---|---|
{chr(10).join(central)}

Targets (issues 4 and 5), over a year: `outages` and `events check` under 10 s and 2 GB;
weekly chart and report under 3 s. How: analysis reads summaries (analysis/summary.py, written by analysis/compaction.py) kept by
the daemon's hourly compaction, plus the raw rows after the cursor, summarised by the same code.
For comparison, Uptime Kuma users report 6-10 GB databases at about 100 monitors.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--store", type=Path, help="time this store, built beforehand, rather than a new one")
    args = parser.parse_args()
    print(measure_year(args.days, args.runs, args.store))


if __name__ == "__main__":
    main()
