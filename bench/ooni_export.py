"""`tunnelwatch export` on a big store, timed as a user runs it: wall time and peak RSS of the
command, for one day of raw rows and for all of them, in each format. Memory is bounded when
the peak does not grow with the rows exported (the store is read a window of rounds at a time).

The store is only read (opened read-only); build one with bench/synth.py, e.g. a year of 100
targets x 4 paths at 5-minute rounds, compacted as the daemon does (raw rows for the last 14
days, summaries before: only raw rows are exported).

Usage: .venv/bin/python bench/ooni_export.py STORE.db [--formats ooni,csv,parquet] [--runs 1]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUNNELWATCH = str(ROOT / ".venv" / "bin" / "tunnelwatch")
SUFFIX = {"ooni": ".jsonl.gz", "csv": ".csv.gz", "parquet": ".parquet"}
MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, done.returncode)
print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "")
"""


def config(tmp: Path, db: Path) -> Path:
    path = tmp / "bench.toml"
    path.write_text(f"""
[vantage]
name = "bench"
labels = {{ cc = "CN", asn = "AS4134" }}
[store]
path = "{db}"
[[targets]]
name = "t000"
group = "blocked"
kind = "http"
url = "https://t000.example/"
[[paths]]
name = "direct"
kind = "direct"
""")
    return path


def run(args: list[str]) -> tuple[float, float, str]:
    result = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, check=True)
    first, said = result.stdout.splitlines()[:2]
    seconds, peak_mb, code = first.split()
    if code != "0":
        raise SystemExit(f"{' '.join(args)} exited {code}: {said}")
    return float(seconds), float(peak_mb), said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path)
    parser.add_argument("--formats", default="ooni,csv,parquet")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    conn = sqlite3.connect(f"file:{args.store}?mode=ro", uri=True)
    lo, hi, raw = conn.execute("SELECT MIN(started_at_ms), MAX(started_at_ms), COUNT(*) FROM measurements").fetchone()
    conn.close()
    first = datetime.fromtimestamp(lo / 1000, UTC)
    print(f"{args.store}: {args.store.stat().st_size / 2**20:,.0f} MiB, {raw:,} raw rows "
          f"{first:%Y-%m-%d %H:%M} to {datetime.fromtimestamp(hi / 1000, UTC):%Y-%m-%d %H:%M} UTC")  # fmt: skip
    day = (first + timedelta(days=1)).date().isoformat()
    print("| format | range | measurements | seconds | measurements/s | peak RSS MB | output MB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfg = config(tmp, args.store)
        for fmt in args.formats.split(","):
            for label, extra in (("one day", ["--until", day]), ("all raw rows", [])):
                out = tmp / f"out{SUFFIX[fmt]}"
                command = [TUNNELWATCH, "export", "--config", str(cfg), "--format", fmt, "--out", str(out), *extra]
                times, peaks, said = [], [], ""
                for _ in range(args.runs):
                    seconds, peak, said = run(command)
                    times.append(seconds)
                    peaks.append(peak)
                count = int(said.split()[1].replace(",", "")) if said.startswith("exported ") else 0
                wall = statistics.median(times)
                print(f"| {fmt} | {label} | {count:,} | {wall:.1f} | {count / wall:,.0f} | {max(peaks):.0f} "
                      f"| {out.stat().st_size / 2**20:.1f} |", flush=True)  # fmt: skip
                out.unlink()


if __name__ == "__main__":
    main()
