"""The daemon's probing while its dashboard is read: does a page load slow a probe down?

The daemon of bench/daemon_load.py (TARGETS http targets x 4 paths every 60 s against nginx,
microsocks and a dnsmasq on loopback) runs twice for MINUTES each: once with nobody reading,
once with 10 page loads a second on metrics.listen (the Now, Outages, History and Events
pages in turn), which the daemon forwards to its `tunnelwatch serve` child. Reported for
each: the rounds' start lateness (heartbeat started_at - scheduled_at), the probes' connect
and total times, missed rounds; and the pages' response times.

Usage: .venv/bin/python bench/dashboard_load.py [--minutes 3] [--targets 500] [--rate 10]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon_load import ZONE, config, dnsmasq, nginx_conf, percentile  # noqa: E402
from tests.servers import LOOPBACK, free_port, running  # noqa: E402

PAGES = ("/", "/outages", "/history", "/events")  # /metrics is not the dashboard's: not read here


def read_pages(origin: str, rate: float, stop: threading.Event, times: dict[str, list[float]]) -> None:
    """GET the pages in turn, `rate` a second, until `stop`; each one's response time."""
    n = 0
    start = time.monotonic()
    while not stop.is_set():
        page = PAGES[n % len(PAGES)]
        began = time.monotonic()
        try:
            with urllib.request.urlopen(origin + page, timeout=120) as answer:
                answer.read()
            times.setdefault(page, []).append(time.monotonic() - began)
        except OSError as exc:
            times.setdefault(f"{page} failed: {exc}", []).append(0.0)
        n += 1
        time.sleep(max(0.0, start + n / rate - time.monotonic()))


def run(minutes: float, targets: int, rate: float) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="tw-dash-bench-"))
    web, socks, metrics, resolver = free_port(), free_port(), free_port(), free_port()
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, web))
    cfg = config(tmp, targets, web, socks, metrics, resolver)
    nginx = [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)]
    times: dict[str, list[float]] = {}
    with (
        dnsmasq(tmp, LOOPBACK, resolver, f"--address=/{ZONE}/{LOOPBACK}"),
        running(nginx, tmp / "nginx.out", web),
        running(["microsocks", "-i", LOOPBACK, "-p", str(socks)], tmp / "socks.out", socks),
    ):
        log = (tmp / "daemon.log").open("w")
        daemon = subprocess.Popen([str(ROOT / ".venv/bin/tunnelwatch"), "run", "--config", str(cfg)], stderr=log)
        stop = threading.Event()
        reader = None
        started = time.monotonic()
        if rate:
            time.sleep(70)  # a round of every target stored before the first page
            reader = threading.Thread(target=read_pages, args=(f"http://{LOOPBACK}:{metrics}", rate, stop, times))
            reader.start()
        time.sleep(max(0.0, minutes * 60 - (time.monotonic() - started)))
        stop.set()
        if reader is not None:
            reader.join()
        wall = time.monotonic() - started
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)
        log.close()
    db = sqlite3.connect(tmp / "bench.db")
    beats = db.execute("SELECT started_at_ms, scheduled_at_ms FROM heartbeats").fetchall()
    probes = db.execute("SELECT connect_ms, total_ms FROM measurements WHERE ok = 1").fetchall()
    db.close()
    shutil.rmtree(tmp, ignore_errors=True)
    late = [(s - sched) / 1000 for s, sched in beats]
    connect = [c for c, _ in probes if c is not None]
    total = [t for _, t in probes if t is not None]
    return {"wall": wall, "rounds": len(beats), "late": late, "connect": connect, "total": total, "pages": times}


def row(name: str, result: dict[str, object]) -> str:
    late, connect, total = result["late"], result["connect"], result["total"]
    assert isinstance(late, list) and isinstance(connect, list) and isinstance(total, list)
    return (
        f"| {name} | {result['rounds']:,} | {percentile(late, 0.5):.3f} / {percentile(late, 0.99):.3f} / "
        f"{max(late):.3f} s | {percentile(connect, 0.5):.2f} / {percentile(connect, 0.99):.2f} ms | "
        f"{percentile(total, 0.5):.2f} / {percentile(total, 0.99):.2f} ms |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--targets", type=int, default=500)
    parser.add_argument("--rate", type=float, default=10, help="page loads a second in the second run")
    args = parser.parse_args()
    load = ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    quiet = run(args.minutes, args.targets, 0)
    read = run(args.minutes, args.targets, args.rate)
    pages = read["pages"]
    assert isinstance(pages, dict)
    print(
        f"""{args.targets} http targets x 4 paths every 60 s on loopback, {args.minutes:g} minutes a run;
load average before: {load}.

| run | rounds | start lateness p50 / p99 / max | connect p50 / p99 | total p50 / p99 |
|---|---|---|---|---|
{row("nobody reading", quiet)}
{row(f"{args.rate:g} page loads a second", read)}

Pages (the second run): """
        + "; ".join(
            f"{page} {len(t)} loads, p50 {percentile(t, 0.5) * 1000:.0f} ms, p99 {percentile(t, 0.99) * 1000:.0f} ms"
            for page, t in sorted(pages.items())
        )
    )


if __name__ == "__main__":
    main()
