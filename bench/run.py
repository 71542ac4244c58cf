"""Every benchmark, one after the other, and bench/RESULTS.md rewritten with every figure,
the command that produced it, the machine and the date. `make bench` runs this (about 65
minutes). Nothing here is a test: targets are written beside the figures, never asserted.

Usage: .venv/bin/python bench/run.py [--quick] [--only probe-rate timing daemon year fleet events startup]
  --quick: shorter runs (a month instead of a year, 1 run each, 10 ordinary dates a series)
           to try the harness.
  --only: run these sections and keep the others' figures from the existing file; every
          section carries the date it was measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.analysis_load import measure_year  # noqa: E402
from bench.daemon_load import measure_daemon  # noqa: E402
from bench.events import measure_events  # noqa: E402
from bench.fleet_load import measure_fleet  # noqa: E402
from bench.probe_rate import measure_all  # noqa: E402
from bench.startup import measure_startup  # noqa: E402
from bench.timing_truth import measure_truth  # noqa: E402

SECTIONS = ("probe-rate", "timing", "daemon", "year", "fleet", "events", "startup")


def _machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return (
        f"{platform.node()}: {model}, {os.cpu_count()} cores, {memory:.0f} GiB; {platform.platform()}; "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args()
    q = args.quick
    plan = {
        "probe-rate": (
            "Probe rate and CPU cost on the probe mix: http and https, IP literals and names (issues 7, 15)",
            f"bench/probe_rate.py --seconds {3 if q else 6} --runs {1 if q else 3} --in-flight 100",
            lambda: measure_all(3 if q else 6, 1 if q else 3, [100]),
        ),
        "timing": (
            "Timing truth under load: connect, first byte and resolve (issues 7, 15)",
            f"bench/timing_truth.py --seconds {5 if q else 10}",
            lambda: measure_truth(5 if q else 10, [1, 100, 500]),
        ),
        "daemon": (
            "The daemon at 10,000 probes a minute, every target a name (issues 3, 15)",
            f"bench/daemon_load.py --minutes {1 if q else 5} --targets 2500",
            lambda: measure_daemon(1 if q else 5, 2500),
        ),
        "year": (
            "A year of measurements: store size and analysis, SQLite and PostgreSQL (issues 4, 5, 7, 8)",
            f"bench/analysis_load.py --days {30 if q else 365} --runs {1 if q else 3}",
            lambda: measure_year(30 if q else 365, 1 if q else 3),
        ),
        "fleet": (
            "Ten vantage points into PostgreSQL (issue 8)",
            f"bench/fleet_load.py --days {1 if q else 2} --vantages 10",
            lambda: measure_fleet(1 if q else 2, 10),
        ),
        "events": (
            "Events check and detect: CPU beyond start-up, and false positives on real series (issue 13)",
            f"bench/events.py --days {30 if q else 365} --runs {1 if q else 3}{' --placebo-limit 10' if q else ''}",
            lambda: measure_events(30 if q else 365, 1 if q else 3, placebo_limit=10 if q else None),
        ),
        "startup": (
            "The command line's start-up: --help, config check, events list, status (issue 14)",
            f"bench/startup.py --days {30 if q else 365} --runs {3 if q else 7}",
            lambda: measure_startup(30 if q else 365, 3 if q else 7),
        ),
    }
    kept = _sections(args.out.read_text()) if args.out.exists() else {}
    parts = []
    for name in SECTIONS:
        title, command, run = plan[name]
        if name not in args.only:
            if title in kept:
                parts.append(kept[title])
            continue
        started = time.perf_counter()
        print(f"running {name}: {command}", file=sys.stderr, flush=True)
        body = run()
        parts.append(
            f"## {title}\n\nCommand: `.venv/bin/python {command}` ({time.perf_counter() - started:.0f} s), "
            f"measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC{' (--quick)' if q else ''}\n\n{body}"
        )
    report = f"""# Benchmarks

Written by `.venv/bin/python bench/run.py` (or `make bench`); each section says when it was
measured (`--only` reruns some sections and keeps the others).
Machine: {_machine()}.
The machine is shared and noisy: compare figures within one section, where they were measured
in the same run, and read ratios rather than absolute rates.

{chr(10).join(parts)}"""
    args.out.write_text(report)
    print(report)


def _sections(text: str) -> dict[str, str]:
    """The existing file's sections by title: "## title" up to the next one."""
    chunks = text.split("\n## ")[1:]
    return {chunk.split("\n", 1)[0]: "## " + chunk.rstrip("\n") + "\n" for chunk in chunks}


if __name__ == "__main__":
    main()
