"""Probe rate and CPU cost against nginx on loopback, a fresh connection per probe.

Clients, each in its own process so its CPU time is its own, driven at IN_FLIGHT probes in
flight for SECONDS (after a second of warm-up):
- tunnelwatch: its real HTTP probe (`probe.rounds.measure`, the Measurement included) on the
  loop the daemon runs (uvloop, `probe.rounds.run`), and on asyncio's own loop;
- raw asyncio: streams writing a fixed HTTP/1.1 request and reading the status line, on the
  default loop and on uvloop: the floor for Python;
- blackbox_exporter (Debian's prometheus-blackbox-exporter) with an http module against the
  same URL, driven by wrk at the same concurrency through its /probe endpoint; its CPU is
  the exporter's (from /proc), wrk's is not counted.

Usage: .venv/bin/python bench/probe_rate.py [--seconds 10] [--runs 3] [--in-flight 50 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon_load import cpu_seconds, nginx_conf  # noqa: E402
from tests.servers import LOOPBACK, free_port, running  # noqa: E402

WARM_UP_S = 1.0
CLIENTS = ("tunnelwatch", "tunnelwatch on asyncio's loop", "raw asyncio", "raw asyncio + uvloop", "blackbox_exporter")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(probe: object, in_flight: int, seconds: float) -> dict[str, float]:
    """`in_flight` workers calling `probe()` back to back; counts what completes after the
    warm-up, and the CPU spent meanwhile."""
    counts = {"probes": 0, "ok": 0}
    loop = asyncio.get_running_loop()
    warm = loop.time() + WARM_UP_S
    end = warm + seconds
    marks: dict[str, float] = {}

    async def worker() -> None:
        while (now := loop.time()) < end:
            ok = await probe()  # type: ignore[operator]
            if now >= warm:
                counts["probes"] += 1
                counts["ok"] += bool(ok)

    async def mark() -> None:
        await asyncio.sleep(WARM_UP_S)
        marks["cpu"], marks["wall"] = _cpu(), time.perf_counter()

    await asyncio.gather(mark(), *(worker() for _ in range(in_flight)))
    return {**counts, "cpu_s": _cpu() - marks["cpu"], "wall_s": time.perf_counter() - marks["wall"]}


def _tunnelwatch(url: str) -> object:
    from probe.config import load_config
    from probe.measure.rounds import ProbeContext, measure

    config = Path(tempfile.mkdtemp(prefix="tw-rate-")) / "bench.toml"
    config.write_text(
        f'[vantage]\nname = "bench"\n[probe]\ntimeout_s = 10\n[metrics]\nenabled = false\n'
        f'[[targets]]\nname = "nginx"\ngroup = "control"\nkind = "http"\nurl = "{url}"\n'
        '[[paths]]\nname = "direct"\nkind = "direct"\n'
    )
    cfg = load_config(config)
    ctx = ProbeContext.build(cfg)
    target, path = cfg.targets[0], cfg.paths[0]

    async def probe() -> bool:
        return (await measure(ctx, target, path, "bench")).ok

    return probe


def _raw(url: str) -> object:
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: raw\r\nConnection: close\r\n\r\n".encode()

    async def probe() -> bool:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        line = await reader.readline()
        writer.transport.abort()
        return line.startswith(b"HTTP/1.1 200")

    return probe


def client(name: str, url: str, in_flight: int, seconds: float) -> None:
    """The child process: drive one client, print its figures as JSON."""
    import uvloop

    from probe.measure.rounds import run_loop

    probe = _tunnelwatch(url) if name.startswith("tunnelwatch") else _raw(url)
    run = {"tunnelwatch": run_loop, "raw asyncio + uvloop": uvloop.run}.get(name, asyncio.run)
    print(json.dumps(run(_drive(probe, in_flight, seconds))))


def _child(name: str, url: str, in_flight: int, seconds: float) -> dict[str, float]:
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--client",
            name,
            "--url",
            url,
            "--in-flight",
            str(in_flight),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.splitlines()[-1])


BLACKBOX_CONFIG = """modules:
  http_2xx:
    prober: http
    timeout: 10s
    http:
      preferred_ip_protocol: ip4
"""


def _blackbox(exporter: int, pid: int, url: str, in_flight: int, seconds: float) -> dict[str, float]:
    probe_url = f"http://{LOOPBACK}:{exporter}/probe?module=http_2xx&target={url}"
    subprocess.run(["wrk", "-t", "2", "-c", str(in_flight), "-d", "1s", probe_url], capture_output=True, check=True)
    cpu = cpu_seconds(pid)
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", str(in_flight), "-d", f"{seconds:g}s", probe_url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    probes = rate * seconds
    return {
        "probes": probes,
        "ok": probes - (int(errors.group(1)) if errors else 0),
        "cpu_s": cpu_seconds(pid) - cpu,
        "wall_s": seconds,
    }


def measure_all(seconds: float, runs: int, in_flights: list[int]) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="tw-rate-"))
    web, exporter = free_port(), free_port()
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, web))
    (tmp / "blackbox.yml").write_text(BLACKBOX_CONFIG)
    url = f"http://{LOOPBACK}:{web}/"
    nginx = [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)]
    blackbox = [
        shutil.which("prometheus-blackbox-exporter") or "prometheus-blackbox-exporter",
        f"--config.file={tmp / 'blackbox.yml'}",
        f"--web.listen-address={LOOPBACK}:{exporter}",
    ]
    figures: dict[tuple[str, int], list[dict[str, float]]] = {}
    with running(nginx, tmp / "nginx.out", web), running(blackbox, tmp / "blackbox.out", exporter) as exporter_proc:
        for _ in range(runs):  # interleaved, so a noisy moment hits every client alike
            for in_flight in in_flights:
                for name in CLIENTS:
                    if name == "blackbox_exporter":
                        sample = _blackbox(exporter, exporter_proc.pid, url, in_flight, seconds)
                    else:
                        sample = _child(name, url, in_flight, seconds)
                    figures.setdefault((name, in_flight), []).append(sample)
    shutil.rmtree(tmp, ignore_errors=True)
    return _table(figures, in_flights, seconds, runs)


def _table(
    figures: dict[tuple[str, int], list[dict[str, float]]], in_flights: list[int], seconds: float, runs: int
) -> str:
    def rate(s: dict[str, float]) -> float:
        return s["probes"] / s["wall_s"]

    def cpu_ms(s: dict[str, float]) -> float:
        return 1000 * s["cpu_s"] / max(s["probes"], 1)

    lines = [
        "| client | in flight | probes/s | CPU ms per probe | cores busy | failed | vs blackbox_exporter | "
        "vs raw asyncio + uvloop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for in_flight in in_flights:
        medians = {name: statistics.median(rate(s) for s in figures[(name, in_flight)]) for name in CLIENTS}
        for name in CLIENTS:
            samples = figures[(name, in_flight)]
            # Ratios are taken run by run (same moment), then their median.
            vs_bb = statistics.median(
                rate(s) / rate(b) for s, b in zip(samples, figures[("blackbox_exporter", in_flight)], strict=True)
            )
            vs_raw = statistics.median(
                rate(s) / rate(r) for s, r in zip(samples, figures[("raw asyncio + uvloop", in_flight)], strict=True)
            )
            failed = sum(s["probes"] - s["ok"] for s in samples)
            cpu = statistics.median(cpu_ms(s) for s in samples)
            lines.append(
                f"| {name} | {in_flight} | {medians[name]:,.0f} | {cpu:.2f} | {medians[name] * cpu / 1000:.1f} | "
                f"{failed:,.0f} | {vs_bb:.2f}x | {vs_raw:.2f}x |"
            )
    return (
        f"Against nginx on loopback (1 worker), a fresh connection per probe; {seconds:g} s per client after "
        f"1 s of warm-up, {runs} interleaved runs, medians (ratios: median of the per-run ratios). Targets: "
        "tunnelwatch at least 2x blackbox_exporter's rate and 0.3x the raw floor, at most 0.5 ms CPU per "
        "probe. Cores busy = rate x CPU per probe: the Python clients run on one core, blackbox_exporter (Go) "
        "on every core it can get, beside nginx and wrk on this 2-core machine.\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args.client, args.url, args.in_flight[0], args.seconds)
        return
    print(measure_all(args.seconds, args.runs, args.in_flight))


if __name__ == "__main__":
    main()
