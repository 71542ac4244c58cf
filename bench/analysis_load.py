"""Analysis commands on synthetic stores: `outages`, `events check`, `chart weekly` and
`report weekly`, timed as a user runs them (wall time and peak RSS of the command).

Builds stores of DAYS days (100 targets x 4 paths, 5-minute rounds; see bench/synth.py),
written and compacted as the daemon does (raw rows for the last 31 days, summaries before),
runs each command RUNS times and reports the median. Targets from the issues: over a year,
`outages` and `events check` under 10 s and 2 GB; the weekly chart and report under 3 s.
The weekly commands run on an old week and on the last full week (its raw rows still kept);
like the daemon, the build compacts as it goes, so both are read from summaries.

Usage: .venv/bin/python bench/analysis_load.py [--days 365] [--runs 3] [--out bench/RESULTS-analysis.md]
"""

from __future__ import annotations

import argparse
import os
import platform
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

TUNNELWATCH = str(ROOT / ".venv" / "bin" / "tunnelwatch")
START = datetime(2018, 3, 1, tzinfo=UTC)
KEEP_RAW_DAYS = 31


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
    path.write_text(f'[vantage]\nname = "bench"\n[store]\npath = "{db}"\n[report]\ndirectory = "{tmp / "reports"}"\n'
                    '[[targets]]\nname = "t000"\ngroup = "blocked"\nkind = "http"\nurl = "https://t000.example/"\n'
                    '[[paths]]\nname = "direct"\nkind = "direct"\n')  # fmt: skip
    return path


def run(command: list[str], cfg: Path, cwd: Path) -> tuple[float, float, int]:
    result = subprocess.run([sys.executable, "-c", MEASURE, TUNNELWATCH, *command, "--config", str(cfg)],
                            capture_output=True, text=True, cwd=cwd)  # fmt: skip
    seconds, rss, code = result.stdout.split()
    return float(seconds), float(rss), int(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, nargs="+", default=[365])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-analysis.md")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tw-analysis-bench-"))
    lines = []
    for days in args.days:
        db = tmp / f"store-{days}d.db"
        started = time.perf_counter()
        rows = build(db, days, 100, START, keep_raw_days=KEEP_RAW_DAYS)
        built = time.perf_counter() - started
        cfg = config(tmp, db)
        size_mb = db.stat().st_size / 1e6
        lines.append(f"| {days} days: {rows:,} measurements; store {size_mb:,.0f} MB (built and compacted in "
                     f"{built:.0f} s) | | | |")  # fmt: skip
        for command in commands(days):
            samples = [run(command, cfg, tmp) for _ in range(args.runs)]
            failed = [code for _, _, code in samples if code != 0]
            wall = statistics.median(s for s, _, _ in samples)
            rss = max(r for _, r, _ in samples)
            lines.append(f"| `tunnelwatch {' '.join(command)}` | {wall:.1f} s | {rss:,.0f} MB | "
                         f"{'exit ' + str(failed[0]) if failed else 'ok'} |")  # fmt: skip
        db.unlink()
    command = f".venv/bin/python bench/analysis_load.py --days {' '.join(map(str, args.days))} --runs {args.runs}"
    report = f"""# Analysis commands on synthetic stores

Command: `{command}`
Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {platform.node()}, {os.cpu_count()} cores,
Python {platform.python_version()}. Stores from bench/synth.py: 100 targets x 4 paths, 5-minute
rounds from 2018-03-01, compacted as the daemon does, raw rows kept {KEEP_RAW_DAYS} days (a tunnel crackdown from the NPC opening, a third of the targets
blocked directly, a daemon gap, 0.5 % noise). Median of {args.runs} runs; peak RSS is the largest.

| command | wall time | peak RSS | |
|---|---|---|---|
{chr(10).join(lines)}

Targets (issues 4 and 5), for a year (42M measurements): `outages` and `events check` under
10 s and 2 GB; weekly chart and report under 3 s.

How: the daemon compacts its store every hour (`tunnelwatch store compact`, analysis/rollup.py):
verdict runs per (target, path), hourly counts per (group, path), hourly latency percentiles per
path and coverage spans, behind a cursor; raw rows go after store.keep_raw_days. Commands read
those plus the raw rows after the cursor, summarised by the same code.
"""
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
