"""The command line's start-up: `tunnelwatch --help`, `config check`, `events list` and `status`
on the synthetic year, each against the floor of a Python that does nothing and one that
imports click, measured in the same run.

Each command runs as a user runs it (`.venv/bin/tunnelwatch ...`, a subprocess, cwd the
repo), output to /dev/null; wall time and CPU (user + system) of the child. Python writes
and reads its bytecode caches as it does for a user (PYTHONDONTWRITEBYTECODE is left out of
the children's environment), and each command runs once before it is timed (the caches, the
store's newest pages in memory). The floors and the commands run RUNS times, interleaved;
figures are medians, ratios the medians of the per-run ratios. For each command, one more run records the modules it had loaded at exit:
pandas, matplotlib, scipy and statsmodels must not be among them. `status` reads each pair's
newest rows by the started_at indexes (probe/store/latest.py): its queries' plans on the
store are shown, none a scan of a table.

Wall times on a shared machine move with its load; the instructions a command executes do
not. When valgrind is installed, each command and floor also runs once under callgrind
(PYTHONHASHSEED=0) and its instruction count is shown beside the wall times: the measure to
compare runs by, and to read the wall times of a loaded machine against.

The synthetic year is bench/synth.py's store as bench/analysis_load.py builds it (100
targets x 4 paths, 5-minute rounds from 2018-03-01, compacted as the daemon does); building
it takes some 15 minutes (more on a busy machine); `--store` reuses one built by
`bench/synth.py STORE.db --days 365 --start 2018-03-01 --compact`.

Usage: .venv/bin/python bench/startup.py [--runs 7] [--days 365] [--store STORE.db]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.analysis_load import KEEP_RAW_DAYS, START, config  # noqa: E402
from bench.synth import build  # noqa: E402
from probe.cli import FAILURES_S  # noqa: E402
from probe.store.latest import latest  # noqa: E402

TUNNELWATCH = str(ROOT / ".venv" / "bin" / "tunnelwatch")
FLOORS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    'python -c "import click"': [sys.executable, "-c", "import click"],
}
COMMANDS = [["--help"], ["config", "check"], ["events", "list"], ["status"]]
TARGET_S = 0.5
DATAFRAME_LIBRARIES = ("pandas", "matplotlib", "scipy", "statsmodels")
# Runs tunnelwatch with ARGV[2:] and writes the names of the modules loaded at exit to ARGV[1].
MODULES = """
import atexit, json, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv[0] = "tunnelwatch"
from probe.cli import main
main()
"""


@dataclass(frozen=True, slots=True)
class Sample:
    wall: float
    cpu: float
    code: int


ENV = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def _run(argv: list[str]) -> Sample:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    code = subprocess.run(
        argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
    ).returncode
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Sample(wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, code)


def _instructions(argv: list[str]) -> float | None:
    """Millions of instructions `argv` executes (callgrind's Ir), or None without valgrind."""
    if shutil.which("valgrind") is None:
        return None
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        cwd=ROOT,
        env={**ENV, "PYTHONHASHSEED": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    counted = [line.split()[-1] for line in result.stderr.splitlines() if "Collected :" in line]
    return int(counted[-1]) / 1e6 if counted else None


def _loaded(command: list[str], tmp: Path) -> list[str]:
    """The data-frame libraries the command had loaded at exit."""
    out = tmp / "modules.json"
    subprocess.run(
        [sys.executable, "-c", MODULES, str(out), *command], cwd=ROOT, capture_output=True, check=False, timeout=120
    )
    return sorted({m.split(".")[0] for m in json.loads(out.read_text())} & set(DATAFRAME_LIBRARIES))


def _plans(db: Path, cycle_s: float) -> list[str]:
    """The query plan of each statement `status` runs on the store."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    latest(conn, now_ms=round(2 * cycle_s * 1000), failures_ms=round(max(FAILURES_S, 2 * cycle_s) * 1000))
    conn.set_trace_callback(None)
    plans = [" / ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {s}")) for s in statements]
    conn.close()
    return plans


def measure_startup(days: int, runs: int, store: Path | None = None) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="tw-startup-bench-"))
    try:
        built = ""
        if store is None:
            store = tmp / f"store-{days}d.db"
            print(f"  building {days} days of measurements into {store}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            rows = build(store, days, 100, START, keep_raw_days=KEEP_RAW_DAYS)
            built = f", built in this run ({rows:,} measurements in {time.perf_counter() - started:.0f} s)"
        cfg = config(tmp, store)
        argvs = {
            **{name: argv for name, argv in FLOORS.items()},
            **{
                f"tunnelwatch {' '.join(c)}": [TUNNELWATCH, *c, *([] if c == ["--help"] else ["--config", str(cfg)])]
                for c in COMMANDS
            },
        }
        for argv in argvs.values():
            _run(argv)  # the bytecode caches written, the store's newest pages read
        load = os.getloadavg()
        samples: dict[str, list[Sample]] = {name: [] for name in argvs}
        for _ in range(runs):
            for name, argv in argvs.items():
                samples[name].append(_run(argv))
        load_after = os.getloadavg()
        instructions = {name: _instructions(argv) for name, argv in argvs.items()}
        rows_out = []
        for name, taken in samples.items():
            wall = statistics.median(s.wall for s in taken)
            cpu = statistics.median(s.cpu for s in taken)
            ratios = [
                statistics.median(s.wall / f.wall for s, f in zip(taken, samples[floor], strict=True))
                for floor in FLOORS
            ]
            failed = [s.code for s in taken if s.code != 0]
            command = argvs[name][1:] if name.startswith("tunnelwatch") else []
            libraries = (", ".join(_loaded(command, tmp)) or "none") if command else ""
            target = "" if not command else ("**yes**" if wall < TARGET_S else "no")
            counted, floor = instructions[name], instructions["python -c pass"]
            executed = f"{counted:,.0f} M ({counted / floor:.1f}x)" if counted and floor else "n/a"
            rows_out.append(
                f"| `{name}` | {wall:.3f} s | {cpu:.3f} s | {ratios[0]:.1f}x | {ratios[1]:.1f}x | {executed} | "
                f"{libraries} | {target} | {'exit ' + str(failed[0]) if failed else 'ok'} |"
            )
        plans = _plans(store, 300)
        size = store.stat().st_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plan_lines = "\n".join(f"- `{plan}`" for plan in plans)
    return f"""The synthetic year (bench/synth.py: {days} days of 100 targets x 4 paths at 5-minute rounds
from {START:%Y-%m-%d}, compacted as the daemon does, raw rows kept {KEEP_RAW_DAYS:g} days; {size / 1e6:,.0f} MB{built}).
Each command as a user runs it (`.venv/bin/tunnelwatch ARGS --config STORE.toml`, cwd the repo,
output to /dev/null, bytecode caches written and read), once untimed, then {runs} runs interleaved
with the floors; medians (ratios: medians of the per-run ratios of wall times). Load average (1, 5,
15 min) {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} before and {load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f} after: the target is for an idle
machine, so read the ratios to the floors, measured in the same run, beside the wall times.
Instructions: millions executed in one run under callgrind (valgrind), whatever the load, and their
ratio to `python -c pass`'s. Data-frame libraries: which of {", ".join(DATAFRAME_LIBRARIES)} the
command had loaded at exit.

| command | wall | CPU | vs `python -c pass` | vs `import click` | instructions | data-frame libraries | under {TARGET_S} s | |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows_out)}

`status` reads each pair's newest rows by the started_at indexes (probe/store/latest.py): the
plans of its queries on this store (`EXPLAIN QUERY PLAN`), none a scan of a table:

{plan_lines}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--store", type=Path, help="a synthetic store already built (bench/synth.py --compact)")
    args = parser.parse_args()
    print(measure_startup(args.days, args.runs, args.store))


if __name__ == "__main__":
    main()
