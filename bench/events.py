"""`events check` and `events detect`: their CPU time on the shared series and on a synthetic
year, against the start-up floor measured in the same run, and the false-positive rate of
`events check` at ordinary dates of the real series.

CPU time is user + system of the command, run as a user runs it (a subprocess, cwd the repo,
so the series are `../shared/data/...` as in the README). Its floor is a process that imports
exactly the modules the command had loaded when it exited (read from a run of the command)
and does nothing else: Python's start-up and the imports, so "beyond start-up" is the work
itself (reading the series and the calendar, the statistics, the output). That difference
is small beside the floor and the machine is noisy, so the work is also measured alone: a
process that imports the same modules, then runs the command in-process, its CPU counted
from then on. Each command, its floor and the work alone run RUNS times, interleaved; the
figures are medians, the difference and the ratio the medians of the per-run ones.

The false-positive rate: made-up one-day events (category "other") on ordinary dates, at
least 30 days from every shipped event and holiday (their windows widened as the check
widens them) and SPACING days from each other, so they are roughly independent; each one is
written alone to an events file and checked alone (`--event ID`, so q = p) with
`--before 3d --after 2d`, a 6-day window like a 4 June check. A made-up event is itself kept
out of its placebo dates, as any event is; that is the design being measured.

The synthetic year is bench/synth.py's store as bench/analysis_load.py builds it (100
targets x 4 paths, 5-minute rounds from 2018-03-01, compacted as the daemon does); building
it takes some 15 minutes (more on a busy machine), `--store` reuses one built by
`bench/synth.py STORE.db --days 365 --start 2018-03-01 --compact`.

Usage: .venv/bin/python bench/events.py [--runs 3] [--days 365] [--store STORE.db] [--spacing 45]
       [--placebo-limit N]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.events import Event, load_events  # noqa: E402
from bench.analysis_load import KEEP_RAW_DAYS, START, config  # noqa: E402
from bench.synth import build  # noqa: E402
from probe.config import load_config  # noqa: E402

TUNNELWATCH = str(ROOT / ".venv" / "bin" / "tunnelwatch")
SHARED = "../shared/data"  # relative to the repo, as the README writes it
GTRENDS = ["--series", f"{SHARED}/gtrends_vpn_cn.csv", "--column", "value", "--missing", "0"]
TOR = ["--series", f"{SHARED}/acsac/data/tor/tor-data-cn.csv", "--column", "users"]
WIDEN = ["--before", "3d", "--after", "2d"]
BEFORE, AFTER = timedelta(days=3), timedelta(days=2)
ACSAC = {  # the paper's inputs, its column and its smoothing (as tests/test_detect.py)
    "tor": ("tor/tor-data-cn.csv", "users", ["--block", "5"]),
    "ooni": ("ooni/ooni-data-cn.csv", "total", ["--block", "5"]),
    "gfwatch": ("gfwatch/gfwatch-data-cn.csv", "count", ["--block", "5"]),
    "http": ("http/http-data-cn.csv", "ratio", []),
    "https": ("https/https-data-cn.csv", "ratio", []),
    "satellite": ("satellite/satellite-data-cn.csv", "ratio", []),
}
PLACEBO_GAP = timedelta(days=30)
ALPHA = 0.05

# Runs ARGV, prints the child's CPU (user + system), wall time, peak RSS and exit code.
MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(usage.ru_utime + usage.ru_stime, time.perf_counter() - started, usage.ru_maxrss / 1024, code)
"""
# Runs tunnelwatch with ARGV[2:] and writes the names of the modules loaded at exit to ARGV[1].
MODULES = """
import atexit, json, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(list(sys.modules))))
sys.argv[0] = "tunnelwatch"
from probe.cli import main
sys.exit(main())
"""
# The floor: imports, in the order the command loaded them, the modules named in ARGV[1].
FLOOR = """
import importlib, json, sys
for name in json.load(open(sys.argv[1])):
    if name not in sys.modules and name not in ("__main__", "__mp_main__"):
        try:
            importlib.import_module(name)
        except ImportError:  # an alias a package puts into sys.modules under another name
            pass
"""
# The work alone: the floor's imports, then tunnelwatch with ARGV[3:], its CPU from then on
# written to ARGV[2] at exit.
RUN_AFTER_FLOOR = """
import atexit, resource
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
out = sys.argv.pop(2)
del sys.argv[1]
sys.argv[0] = "tunnelwatch"
from probe.cli import main
started = cpu()
atexit.register(lambda: open(out, "w").write(str(cpu() - started)))
sys.exit(main())
"""
WORK = FLOOR + RUN_AFTER_FLOOR


@dataclass(frozen=True, slots=True)
class Sample:
    cpu: float
    wall: float
    rss: float
    code: int


def _measure(argv: list[str]) -> Sample:
    result = subprocess.run([sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, cwd=ROOT)
    cpu, wall, rss, code = result.stdout.split()
    return Sample(float(cpu), float(wall), float(rss), int(code))


def _timed(command: list[str], extra: list[str], tmp: Path, runs: int) -> str:
    """One table row: `tunnelwatch COMMAND` (EXTRA: options not shown, e.g. --config) against
    a floor importing what it imported."""
    modules = tmp / "modules.json"
    subprocess.run(
        [sys.executable, "-c", MODULES, str(modules), *command, *extra],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    pairs, work = [], []
    for _ in range(runs):
        pairs.append((_measure([sys.executable, "-c", FLOOR, str(modules)]), _measure([TUNNELWATCH, *command, *extra])))
        (tmp / "work").unlink(missing_ok=True)
        _measure([sys.executable, "-c", WORK, str(modules), str(tmp / "work"), *command, *extra])
        work.append(float((tmp / "work").read_text()))
    floor = statistics.median(f.cpu for f, _ in pairs)
    cpu = statistics.median(c.cpu for _, c in pairs)
    beyond = statistics.median(c.cpu - f.cpu for f, c in pairs)
    ratio = statistics.median(c.cpu / f.cpu for f, c in pairs)
    wall = statistics.median(c.wall for _, c in pairs)
    rss = max(c.rss for _, c in pairs)
    failed = [c.code for _, c in pairs if c.code != 0]
    return (
        f"| `tunnelwatch {' '.join(command)}` | {cpu:.2f} s | {floor:.2f} s | **{beyond:.2f} s** | "
        f"{statistics.median(work):.2f} s | {ratio:.2f}x | "
        f"{wall:.1f} s | {rss:,.0f} MB | {'exit ' + str(failed[0]) if failed else 'ok'} |"
    )


def series_commands() -> list[list[str]]:
    checks = [
        ["events", "check", *GTRENDS, *WIDEN, "--pool", "--format", "json"],
        ["events", "check", *GTRENDS, *WIDEN, "--pool", "--seasonal", "7d", "--format", "json"],
        ["events", "check", *TOR, *WIDEN, "--pool", "--format", "json"],
    ]
    detects = []
    for method in ("mann-kendall", "baseline"):
        for file, column, options in ACSAC.values():
            chosen = ["--method", "mann-kendall", *options] if method == "mann-kendall" else []
            detects.append(
                [
                    "events",
                    "detect",
                    "--series",
                    f"{SHARED}/acsac/data/{file}",
                    "--column",
                    column,
                    *chosen,
                    "--format",
                    "json",
                ]
            )
    return checks + detects


STORE_COMMANDS = [
    ["outages", "--format", "csv"],  # the peer: the same reading of the store, no event statistics
    ["events", "check", "--pool", "--format", "json"],
    ["events", "detect", "--format", "json"],
    ["events", "detect", "--method", "mann-kendall", "--format", "json"],
]


# The false-positive rate at ordinary dates.


def _fake(day: date) -> Event:
    return Event(
        id=f"ordinary-{day.isoformat()}",
        title=f"An ordinary date ({day.isoformat()}, bench/events.py)",
        category="other",
        start=day,
        end=day,
        source="bench/events.py",
    )


def ordinary_dates(first: date, last: date, events: list[Event], spacing: int) -> list[date]:
    """Dates whose widened window is at least PLACEBO_GAP from every event's widened window,
    with room for a baseline before them and the onset search after, `spacing` days apart."""
    spans = sorted((e.window[0] - BEFORE, e.window[1] + AFTER) for e in events)
    chosen: list[date] = []
    day = first + timedelta(days=60)  # the gap (7) and a baseline of 28 usable days, with room
    while day <= last - timedelta(days=20):  # the onset search reaches 14 days past the window
        start, end = (t + d for t, d in zip(_fake(day).window, (-BEFORE, AFTER), strict=True))
        if all(end + PLACEBO_GAP <= a or b + PLACEBO_GAP <= start for a, b in spans):
            chosen.append(day)
            day += timedelta(days=spacing)
        else:
            day += timedelta(days=1)
    return chosen


def _toml(event: Event) -> str:
    return (
        f'[[events]]\nid = "{event.id}"\ntitle = "{event.title}"\ncategory = "{event.category}"\n'
        f'start = {event.start}\nend = {event.end}\nsource = "{event.source}"\n'
    )


def false_positives(
    series: list[str], tmp: Path, events: list[Event], spacing: int, limit: int | None
) -> tuple[list[tuple[date, float | None, str]], float]:
    """Each ordinary date checked alone: (date, p, verdict); and the CPU seconds it took."""
    path, column = Path(ROOT, series[1]), series[3]
    days = pd.to_datetime(pd.read_csv(path, usecols=["date"])["date"])
    dates = ordinary_dates(days.min().date(), days.max().date(), events, spacing)[:limit]
    results, cpu = [], 0.0
    for day in dates:
        fake = _fake(day)
        file = tmp / f"{fake.id}.toml"
        file.write_text(_toml(fake))
        argv = [
            TUNNELWATCH,
            "events",
            "check",
            *series,
            *WIDEN,
            "--events",
            str(file),
            "--event",
            fake.id,
            "--format",
            "json",
        ]
        started = _children_cpu()
        result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        cpu += _children_cpu() - started
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr}")
        (row,) = [json.loads(line) for line in result.stdout.splitlines()]
        results.append((day, row["p_value"], row["verdict"]))
    print(f"  {column}: {len(dates)} ordinary dates checked", file=sys.stderr, flush=True)
    return results, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _rate_row(name: str, results: list[tuple[date, float | None, str]]) -> str:
    from scipy.stats import binomtest

    evaluable = [(d, p) for d, p, _ in results if p is not None]
    flagged = [(d, p) for d, p in evaluable if p < ALPHA]
    n, k = len(evaluable), len(flagged)
    if not n:
        return f"| {name} | {len(results)} | 0 | | | | |"
    test = binomtest(k, n, ALPHA)
    ci = test.proportion_ci(confidence_level=0.95)
    which = ", ".join(f"{d} (p = {p:.3f})" for d, p in flagged) or "none"
    return (
        f"| {name} | {len(results)} | {n} | {k} | **{k / n:.1%}** [{ci.low:.1%}, {ci.high:.1%}] | "
        f"{test.pvalue:.2f} | {which} |"
    )


def measure_events(
    days: int, runs: int, spacing: int = 45, placebo_limit: int | None = None, store: Path | None = None
) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="tw-events-bench-"))
    try:
        series_rows = []
        for command in series_commands():
            print(f"  tunnelwatch {' '.join(command)}", file=sys.stderr, flush=True)
            series_rows.append(_timed(command, [], tmp, runs))
        built = ""
        if store is None:
            store = tmp / f"store-{days}d.db"
            started = time.perf_counter()
            rows = build(store, days, 100, START, keep_raw_days=KEEP_RAW_DAYS)
            built = f", built here ({rows:,} measurements, {time.perf_counter() - started:.0f} s)"
        cfg = config(tmp, store)
        store_rows = []
        for command in STORE_COMMANDS:
            print(f"  tunnelwatch {' '.join(command)} (synthetic store)", file=sys.stderr, flush=True)
            store_rows.append(_timed(command, ["--config", str(cfg)], tmp, runs))
        calendar = load_events(load_config().analysis.events)
        rates, placebo_cpu, checked = [], 0.0, []
        for name, series in (
            ("Google Trends `vpn`, China (`--missing 0`)", GTRENDS),
            ("Tor users, China (ACSAC 2024 data)", TOR),
        ):
            results, cpu = false_positives(series, tmp, calendar, spacing, placebo_limit)
            rates.append(_rate_row(name, results))
            placebo_cpu += cpu
            checked += results
        both = _rate_row("both", checked)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    limit = f", the first {placebo_limit} of each series" if placebo_limit else ""
    return f"""CPU time (user + system) of each command as a user runs it (cwd the repo), against its
start-up floor: a process importing exactly the modules the command had loaded when it
exited, and doing nothing else. Beyond start-up = command - floor: reading the series (or
the store) and the calendar, the statistics and the output. Work in-process: the same
measured directly, in a process that imported those modules and then ran the command's
`main()`, its CPU counted from then on (no subtraction of two noisy figures: on a busy
machine the floor varies by some 0.5 s from run to run, so a difference can even come out
below zero). {runs} interleaved runs of each command, its floor and its work; medians
(difference and ratio: medians of the per-run ones); wall time is the median, peak RSS the
largest. The calendar is the shipped one ({len(calendar)} events, holidays included). Detect runs on
the six China series of the ACSAC 2024 paper, with `--method mann-kendall` (`--block 5` for
the counts, as the paper and tests/test_detect.py do) and with the default method.

| command | CPU | start-up floor | beyond start-up | work in-process | vs floor | wall | peak RSS | |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(series_rows)}

The synthetic year (bench/synth.py: {days} days of 100 targets x 4 paths at 5-minute rounds
from 2018-03-01, compacted as the daemon does, raw rows kept {KEEP_RAW_DAYS:g} days{built}):
the store's outage minutes per measured minute, every shipped event. Most of the work there
is reading the year (the summaries and {KEEP_RAW_DAYS:g} days of raw rows into outages): `outages`, which
reads the same and does no statistics, is the peer measured in the same run.

| command | CPU | start-up floor | beyond start-up | work in-process | vs floor | wall | peak RSS | |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(store_rows)}

Targets (issue 13): the whole Google Trends series with every shipped event, pooled, under
2 s of CPU beyond start-up; the synthetic year under 10 s (issues 4 and 5: wall time).

False positives at ordinary dates of the real series: made-up one-day events (category
"other") at least 30 days from every shipped event and holiday (windows widened as the check
widens them), {spacing} days or more apart{limit}, each written alone to an events file and
checked alone, so q = p:
`tunnelwatch events check SERIES --before 3d --after 2d --events ordinary-DATE.toml --event ordinary-DATE --format json`
(a 6-day window, like a 4 June check). The made-up event is kept out of its own placebo
dates, as every event is. Expected: 5 % with p < 0.05. Interval: exact (Clopper-Pearson)
95 %; binomial p: the count against 5 %. {placebo_cpu:.0f} s of CPU for the {len(checked)} checks.

| series | dates | evaluable | p < 0.05 | share [95 % interval] | binomial p vs 5 % | flagged |
|---|---|---|---|---|---|---|
{chr(10).join(rates)}
{both}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--store", type=Path, help="a synthetic store already built (bench/synth.py --compact)")
    parser.add_argument("--spacing", type=int, default=45, help="days between ordinary dates")
    parser.add_argument("--placebo-limit", type=int, help="check only the first N ordinary dates of each series")
    args = parser.parse_args()
    print(measure_events(args.days, args.runs, args.spacing, args.placebo_limit, args.store))


if __name__ == "__main__":
    main()
