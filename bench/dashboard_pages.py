"""How long each dashboard page takes over a store: made from nothing (cold) and kept.

Through the application itself (Starlette's TestClient, no network, no pages warmed at
start): the store's summaries are first read into memory and the raw rows after their cursor
summarised, as a `tunnelwatch serve` process does as it starts (ranges.Held, timed apart:
"start-up"); then each page is asked for twice,
made from scratch the first time (a range this process has never computed), kept the second.
Its CPU: the process' CPU time (every thread's) while the page was made, and its drawing
child's (analysis/web/draw.py: History's availability and latency charts, read from /proc),
which the other work on a shared machine inflates less than the wall time. With --repeat N,
History is then made over N more ranges of the same length, each a day later, each from
scratch: the median and range of N samples (one page's time varies by a third from run to
run on a shared machine).
Now, History, Outages, Events and Reports with their defaults, then History, Outages and
Events over [--since, --until) (a year of the synthetic store by default). With --cold, the
summaries are not read beforehand: the first page pays for it.

With --live HOURS, the pages are served from a copy of the store as a running daemon holds
it: HOURS of rounds after its cursor, not compacted (a daemon compacts every hour), and
before each page another 5 minutes of rounds, every target's (bench/synth.py's), written
to it: every page finds rounds its process has not summarised. With --pause SECONDS, the
pages are asked for that long apart (a reader looks at a page before the next), so work a
page leaves for the background is done before the next starts; without, back to back.

With --postgres, the store is first forwarded to a throwaway PostgreSQL cluster on loopback
(tests/postgres.py; its raw rows and summaries, as a vantage point's forwarder sends them),
and the pages are served from there (analysis.store = the cluster's URL).

Usage: .venv/bin/python bench/dashboard_pages.py CONFIG [--since 2018-03-01] [--until 2019-03-01]
       [--cold] [--postgres | --live HOURS [--pause SECONDS]] [--repeat N]
(CONFIG's store.path, e.g. the synthetic year of bench/synth.py STORE.db --days 365 --compact)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

try:
    from analysis.web import draw  # noqa: E402
except ImportError:  # a tree from before the drawing child (measured against: RESULTS.md)
    draw = None  # type: ignore[assignment]
from analysis.web.app import GC_THRESHOLD, build_app, read_summaries  # noqa: E402
from probe.config import Config, StoreSettings, load_config  # noqa: E402


@contextlib.contextmanager
def central(cfg_path: Path) -> Iterator[Path]:
    """CONFIG's store forwarded to a throwaway PostgreSQL, and a config that reads it there."""
    from probe.fleet.forwarder import Forwarder
    from tests.postgres import cluster

    cfg = load_config(cfg_path)
    with cluster(fsync=True) as server, tempfile.TemporaryDirectory(prefix="tw-pages-") as tmp:
        url = server.database("pages")
        spool = Path(tmp) / "spool.db"  # the forwarder notes its progress in the store: a copy's
        shutil.copyfile(cfg.store.path, spool)
        started = time.perf_counter()
        forwarder = Forwarder(spool, url, cfg.vantage.name, StoreSettings().forward_batch, 100_000_000)
        forwarder.forward()
        forwarder.close()
        print(f"forwarded to PostgreSQL in {time.perf_counter() - started:.0f} s")
        if True:
            path = Path(tmp) / "central.toml"
            text = cfg_path.read_text()
            path.write_text(
                text.replace("[store]", f'[analysis]\nstore = "{url}"\nvantage = "{cfg.vantage.name}"\n[store]', 1)
            )
            yield path


@contextlib.contextmanager
def live(cfg_path: Path, hours: float) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A copy of CONFIG's store with HOURS of rounds after its newest, and a function that
    writes the next 5 minutes of rounds to it; a config that reads the copy."""
    from bench.synth import INTERVAL_MS, build

    cfg = load_config(cfg_path)
    with tempfile.TemporaryDirectory(prefix="tw-live-") as tmp:
        copy = Path(tmp) / "live.db"
        conn = sqlite3.connect(f"file:{cfg.store.path}?mode=ro", uri=True)
        conn.execute(f"VACUUM INTO '{copy}'")  # a consistent copy, WAL included
        (newest,) = conn.execute("SELECT MAX(started_at_ms) FROM heartbeats").fetchone()
        (targets,) = conn.execute(
            "SELECT COUNT(DISTINCT target) FROM heartbeats WHERE started_at_ms > ?", (newest - INTERVAL_MS,)
        ).fetchone()
        conn.close()
        slot = [newest - newest % INTERVAL_MS + INTERVAL_MS]

        def write(rounds: int) -> None:
            start = datetime.fromtimestamp(slot[0] / 1000, UTC)
            build(copy, 0, targets, start, seed=slot[0] % 1000, rounds=rounds)
            slot[0] += rounds * INTERVAL_MS

        began = time.perf_counter()
        write(int(hours * 3_600_000 / INTERVAL_MS))
        print(
            f"{hours:g} h of rounds of {targets} targets written after the cursor in {time.perf_counter() - began:.0f} s"
        )
        path = Path(tmp) / "live.toml"
        path.write_text(cfg_path.read_text().replace(str(cfg.store.path), str(copy)))
        if load_config(path).store.path != copy:
            raise SystemExit(f"{cfg_path}: store.path must be written out as {cfg.store.path}")
        yield path, lambda: write(1)


def measure(
    cfg: Config,
    pages: list[str],
    cold: bool,
    between: Callable[[], None] | None = None,
    pause: float = 0.0,
    again: list[str] | None = None,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette.testclient over httpx: deprecated, still working
        from starlette.testclient import TestClient
    load = ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"load average before: {load}\n")
    with TestClient(build_app(cfg, warm=False)) as client:
        if not cold:
            began = time.perf_counter()
            read_summaries(cfg)  # as `serve` does as it starts: read, then frozen out of the collector's walks
            gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])  # as serve_cli.py sets it
            print(f"start-up: the store's summaries read into memory in {time.perf_counter() - began:.2f} s")
            began = time.perf_counter()
            child = _child_pid()  # as serve's first History page (warmed as it starts) starts it
            print(f"start-up: the drawing child (pid {child}) started in {time.perf_counter() - began:.2f} s\n")
        print("| page | made from scratch | its CPU | kept | size |\n|---|---|---|---|---|")
        for url in pages:
            times, cpu = [], []
            time.sleep(pause)
            if between is not None:
                between()  # the daemon stored rounds since the last page
            for _ in range(2):
                child = _child_pid()
                busy = time.process_time() + _child_cpu(child)
                began = time.perf_counter()
                answer = client.get(url)
                times.append(time.perf_counter() - began)
                cpu.append(time.process_time() + _child_cpu(child) - busy)
                if answer.status_code != 200:
                    raise SystemExit(f"{url}: {answer.status_code} {answer.text[:300]}")
            print(
                f"| `{url}` | {times[0]:.2f} s | {cpu[0]:.2f} s | {times[1] * 1000:.0f} ms | "
                f"{len(answer.content) / 1024:.0f} KiB |"
            )
        if again:
            made, used = [], []
            for url in again:  # each a range this process has not made: made from scratch
                time.sleep(pause)
                if between is not None:
                    between()
                child = _child_pid()
                busy = time.process_time() + _child_cpu(child)
                began = time.perf_counter()
                if client.get(url).status_code != 200:
                    raise SystemExit(f"{url}: not answered")
                made.append(time.perf_counter() - began)
                used.append(time.process_time() + _child_cpu(child) - busy)
            print(
                f"\n{len(again)} more ranges of the same length, each a day later (`{again[0]}` ...), each made "
                f"from scratch: median {statistics.median(made):.2f} s ({min(made):.2f}-{max(made):.2f} s), its CPU "
                f"median {statistics.median(used):.2f} s ({min(used):.2f}-{max(used):.2f} s)"
            )
    load = ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    status = Path("/proc/self/status").read_text()
    now = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024
    print(f"\nload average after: {load}; the process' resident memory: {now:.0f} MB now, {peak:.0f} MB at the peak")
    child = _child_pid()
    if child is not None:
        print(
            f"the drawing child's resident memory: {_memory(child, 'VmRSS')} MB now, {_memory(child, 'VmHWM')} MB "
            f"at the peak, {_memory(child, 'RssAnon')} MB of it not shared (no file behind it)"
        )


def _child_pid() -> int | None:
    return None if draw is None else draw.child_pid()


def _child_cpu(child: int | None) -> float:
    """The drawing child's CPU time so far (draw.py): a page's charts are drawn there in part."""
    if child is None:
        return 0.0
    fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _memory(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:"))) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--since", default="2018-03-01")
    parser.add_argument("--until", default="2019-03-01")
    parser.add_argument("--cold", action="store_true", help="do not read the summaries before the first page")
    parser.add_argument("--postgres", action="store_true", help="serve from PostgreSQL, the store forwarded there")
    parser.add_argument("--live", type=float, metavar="HOURS", help="raw rows after the cursor, more before each page")
    parser.add_argument("--pause", type=float, default=0.0, metavar="SECONDS", help="between one page and the next")
    parser.add_argument("--repeat", type=int, default=0, metavar="N", help="History over N more ranges, a day apart")
    args = parser.parse_args()
    span = f"since={args.since}&until={args.until}"
    pages = ["/", "/history", "/outages", "/events", "/reports"]
    pages += [f"/history?{span}", f"/outages?{span}", f"/events?{span}"]
    shifted = [
        (datetime.fromisoformat(args.since) + timedelta(days=k), datetime.fromisoformat(args.until) + timedelta(days=k))
        for k in range(1, args.repeat + 1)
    ]
    again = [f"/history?since={a:%Y-%m-%d}&until={b:%Y-%m-%d}" for a, b in shifted]
    if args.postgres:
        with central(args.config) as config:
            measure(load_config(config), pages, args.cold, again=again)
    elif args.live is not None:
        with live(args.config, args.live) as (config, write):
            measure(load_config(config), pages, args.cold, write, args.pause, again)
    else:
        measure(load_config(args.config), pages, args.cold, again=again)


if __name__ == "__main__":
    main()
