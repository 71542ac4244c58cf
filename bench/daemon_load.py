"""Daemon under load: 10,000 probes a minute against loopback servers for 5 minutes.

Starts nginx, microsocks and a dnsmasq on loopback, writes a config of TARGETS http targets x
4 paths (direct, two bind addresses, SOCKS5) at a 60 s interval, runs `tunnelwatch run` as a
subprocess, and reports from the store and /proc. Each target has a name of its own
(http://tN.site.test:P/N), resolved by every probe through the path's resolver, the dnsmasq
(no cache; on the SOCKS5 path too: `remote_dns = false`); `--ip-literals` probes
http://127.0.0.1:P/N instead, as before issue 15. Reported:
- p50/p99/max start lateness of rounds (heartbeat started_at - scheduled_at; target p99 < 1 s)
- missed rounds: expected on the schedule minus those run (target 0)
- CPU seconds per minute and peak RSS of the daemon (target < 200 MB)

Usage: .venv/bin/python bench/daemon_load.py [--minutes 5] [--targets 2500] [--ip-literals]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.exception
import dns.message
import dns.query

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import LOOPBACK, free_port, running  # noqa: E402

PATHS = 4
ZONE = "site.test"


def nginx_conf(tmp: Path, port: int, tls: tuple[int, Path, Path] | None = None) -> str:
    """One worker answering every path with a small page; with `tls` (port, certificate chain,
    key) a second server answering the same over TLS."""
    temp = " ".join(f"{k}_temp_path {tmp / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;" if os.geteuid() == 0 else ""
    page = 'location / { return 200 "<title>bench</title>ok"; }'
    https = ""
    if tls:
        tls_port, chain, key = tls
        https = (
            f"server {{ listen {LOOPBACK}:{tls_port} ssl backlog=4096; ssl_certificate {chain}; "
            f"ssl_certificate_key {key}; {page} }}"
        )
    return f"""{user} daemon off; worker_processes 1; pid {tmp / "nginx.pid"}; error_log {tmp / "error.log"};
events {{ worker_connections 4096; }}
http {{ access_log off; {temp}
  server {{ listen {LOOPBACK}:{port} backlog=4096; {page} }} {https} }}
"""


@contextmanager
def dnsmasq(tmp: Path, address: str, port: int, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """A dnsmasq on `address`:`port` answering from its options alone (no resolv.conf, no
    hosts file) and caching nothing, once it answers."""
    args = [
        shutil.which("dnsmasq") or "/usr/sbin/dnsmasq",
        "--keep-in-foreground",
        f"--port={port}",
        f"--listen-address={address}",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--pid-file=",
        "--cache-size=0",
        *options,
    ]
    with running(args, tmp / f"dnsmasq-{port}.log") as proc:
        deadline = time.monotonic() + 10
        while True:
            try:
                dns.query.udp(dns.message.make_query("probe.test", "A"), address, port=port, timeout=0.2)
                break
            except (dns.exception.Timeout, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (tmp / f"dnsmasq-{port}.log").read_text(errors="replace")
                    raise RuntimeError(f"dnsmasq did not answer on {address}:{port}: {log}") from None
        yield proc


def config(tmp: Path, targets: int, web: int, socks: int, metrics: int, resolver: int | None = None) -> Path:
    """With `resolver` (the dnsmasq's port on loopback) every target has a name of its own,
    resolved there on every path; without, IP literals."""
    lines = [
        '[vantage]\nname = "bench"\n',
        f'[store]\npath = "{tmp / "bench.db"}"\n',
        "[probe]\ninterval_s = 60\ntimeout_s = 10\nconcurrency = 200\nper_path_concurrency = 100\n",
        f'[metrics]\nlisten = "{LOOPBACK}:{metrics}"\n',
    ]
    for i in range(targets):
        host = f"t{i}.{ZONE}" if resolver else LOOPBACK
        lines.append(f'[[targets]]\nname = "t{i}"\ngroup = "blocked"\nkind = "http"\nurl = "http://{host}:{web}/{i}"\n')
    own = f'resolver = ["{LOOPBACK}:{resolver}"]\n' if resolver else ""
    lines.append(f'[[paths]]\nname = "direct"\nkind = "direct"\n{own}')
    lines.append(f'[[paths]]\nname = "bind2"\nkind = "bind"\naddress = "127.0.0.2"\n{own}')
    lines.append(f'[[paths]]\nname = "bind3"\nkind = "bind"\naddress = "127.0.0.3"\n{own}')
    socks_dns = "remote_dns = false\n" if resolver else ""
    lines.append(f'[[paths]]\nname = "socks"\nkind = "socks5"\nhost = "{LOOPBACK}"\nport = {socks}\n{own}{socks_dns}')
    path = tmp / "bench.toml"
    path.write_text("\n".join(lines))
    return path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure_daemon(minutes: float, targets: int, names: bool = True) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="tw-bench-"))
    web, socks, metrics, resolver = free_port(), free_port(), free_port(), free_port()
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, web))
    cfg = config(tmp, targets, web, socks, metrics, resolver if names else None)
    nginx = [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)]
    load_before = ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    with (
        dnsmasq(tmp, LOOPBACK, resolver, f"--address=/{ZONE}/{LOOPBACK}"),
        running(nginx, tmp / "nginx.out", web),
        running(["microsocks", "-i", LOOPBACK, "-p", str(socks)], tmp / "socks.out", socks),
    ):
        log = (tmp / "daemon.log").open("w")
        daemon = subprocess.Popen([str(ROOT / ".venv/bin/tunnelwatch"), "run", "--config", str(cfg)], stderr=log)
        started = time.monotonic()
        cpu_start = cpu_seconds(daemon.pid)
        time.sleep(minutes * 60)
        cpu = cpu_seconds(daemon.pid) - cpu_start
        wall = time.monotonic() - started
        rss = peak_rss_mb(daemon.pid)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)
        log.close()
    db = sqlite3.connect(tmp / "bench.db")
    beats = db.execute("SELECT target, started_at_ms, scheduled_at_ms, finished_at_ms FROM heartbeats").fetchall()
    probes = db.execute("SELECT COUNT(*), SUM(ok), AVG(total_ms) FROM measurements").fetchone()
    failures = db.execute("SELECT failure, COUNT(*) FROM measurements WHERE ok = 0 GROUP BY failure").fetchall()
    db.close()
    lateness = [(s - sched) / 1000 for _, s, sched, _ in beats]
    first = min(sched for *_, sched, _ in beats)
    end_ms = first + wall * 1000
    # Each target's rounds fall every 60 s from its first; expected = rounds due before the end.
    expected = 0
    firsts: dict[str, int] = {}
    for target, _, sched, _ in beats:
        firsts[target] = min(firsts.get(target, sched), sched)
    for target_first in firsts.values():
        expected += int((end_ms - 30_000 - target_first) // 60_000) + 1  # not the ones too close to the end
    run = sum(1 for _, _, sched, _ in beats if sched <= end_ms - 30_000)
    rate = probes[0] / (wall / 60)
    shutil.rmtree(tmp, ignore_errors=True)
    load_after = ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    if names:
        urls = (
            f"URLs name a host each (http://tN.{ZONE}:P/N), resolved by every probe (A and AAAA) through\n"
            "the path's resolver, a dnsmasq on loopback caching nothing (`--cache-size=0`); the SOCKS5\n"
            "path resolves here too (`remote_dns = false`)."
        )
    else:
        urls = "URLs are IP literals (http://127.0.0.1:P/N): no probe resolves a name."
    return f"""Load: {targets} http targets x {PATHS} paths (direct, bind 127.0.0.2, bind 127.0.0.3, microsocks
SOCKS5) every 60 s against nginx on loopback, for {wall / 60:.1f} minutes, `tunnelwatch run` as a
subprocess; figures from the store and /proc.
{urls}
Load average (1, 5, 15 min) {load_before} before and {load_after} after.

| figure | value | target |
|---|---|---|
| probes per minute | {rate:,.0f} | 10,000 |
| probes stored / succeeded | {probes[0]:,} / {probes[1] or 0:,} | |
| mean probe total time | {probes[2] or 0:.1f} ms | |
| rounds run / due | {run:,} / {expected:,} | |
| missed rounds | {max(0, expected - run)} | 0 |
| start lateness p50 / p99 / max | {percentile(lateness, 0.5):.3f} / {percentile(lateness, 0.99):.3f} / {max(lateness):.3f} s | p99 < 1 s |
| daemon CPU | {cpu / (wall / 60):.1f} s per minute ({100 * cpu / wall:.0f} % of one core) | |
| daemon peak RSS | {rss:.0f} MB | < 200 MB |

Failures: {", ".join(f"{f}: {n}" for f, n in failures) or "none"}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--targets", type=int, default=2500)
    parser.add_argument("--ip-literals", action="store_true", help="probe IP literals, resolving no name")
    args = parser.parse_args()
    print(measure_daemon(args.minutes, args.targets, names=not args.ip_literals))


if __name__ == "__main__":
    main()
