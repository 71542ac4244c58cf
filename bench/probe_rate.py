"""Probe rate and CPU cost against nginx on loopback, a fresh connection per probe, on the probe
mix users run: http and https, to an IP literal and to a name.

Kinds of target, side by side in one run:
- http IP literal (http://127.0.0.1:P/), http name (http://site.test:P/), https IP literal and
  https name (nginx serving TLS with a certificate of a test CA, trustme's);
- the name is answered by a dnsmasq on loopback (RESOLVER, port 53, `--cache-size=0`), asked
  afresh by every probe of every client: its A record from `--address`, and no AAAA record
  (NOERROR without an answer: `--local` makes dnsmasq the name's authority, as a name without
  IPv6 has; without it dnsmasq refuses the AAAA query it cannot forward, and a stub asks a
  refused query again, as glibc does).

Clients, each in its own process so its CPU time is its own, driven at IN_FLIGHT probes in
flight for SECONDS (after a second of warm-up):
- tunnelwatch: its real HTTP probe (`probe.measure.rounds.measure`, the Measurement included)
  on the loop the daemon runs (uvloop, `run_loop`), the path's resolver the dnsmasq; on the
  http IP literal also on asyncio's own loop;
- raw asyncio: for a name, A and AAAA asked at once on one UDP socket (dnspython's wire
  format), then streams (TLS for https: the test CA verified, the same SNI and ALPN as
  tunnelwatch's context) writing a fixed HTTP/1.1 request
  and reading the status line, on uvloop: the floor for Python (on the http IP literal also on
  the default loop);
- on the http name, tunnelwatch after the floor's lookup: the least lookup Python can make
  (`lean_lookup`: one shared socket, no question check, no retry, no record of the answers),
  then tunnelwatch's own probe of the address; its CPU against tunnelwatch's IP literal is the
  least "CPU per resolved probe against the IP literal's" a lookup in Python can reach here;
- blackbox_exporter (Debian's prometheus-blackbox-exporter) with an http module (the test CA
  in its tls_config) against the same URL, driven by wrk at the same concurrency through its
  /probe endpoint; it resolves through the system resolver, so it runs in a mount namespace
  of its own (`unshare -m`) where a resolv.conf naming the dnsmasq is bind-mounted over
  /etc/resolv.conf. Its CPU is the exporter's (from /proc), wrk's is not counted.

Usage: .venv/bin/python bench/probe_rate.py [--seconds 6] [--runs 3] [--in-flight 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import dns.message
import dns.rdatatype

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon_load import cpu_seconds, dnsmasq, nginx_conf  # noqa: E402
from tests.servers import LOOPBACK, free_port, running  # noqa: E402

WARM_UP_S = 1.0
RESOLVER = "127.0.153.53"  # the dnsmasq, on port 53 (a resolv.conf names no port)
NAME = "site.test"
FLOOR_LOOKUP = "tunnelwatch after the floor's lookup"
CLIENTS = (
    "tunnelwatch",
    "tunnelwatch on asyncio's loop",
    FLOOR_LOOKUP,
    "raw asyncio",
    "raw asyncio + uvloop",
    "blackbox_exporter",
)
KINDS = ("http IP literal", "http name", "https IP literal", "https name")
# The loops compared on the http IP literal only; the other kinds against the floor and the peer.
MIX_CLIENTS = ("tunnelwatch", "raw asyncio + uvloop", "blackbox_exporter")


def _clients(kind: str) -> tuple[str, ...]:
    if kind == KINDS[0]:
        return tuple(name for name in CLIENTS if name != FLOOR_LOOKUP)
    if kind == "http name":  # what a named probe of tunnelwatch's would cost with the least lookup
        return (MIX_CLIENTS[0], FLOOR_LOOKUP, *MIX_CLIENTS[1:])
    return MIX_CLIENTS


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Probe = Callable[[], Awaitable[bool]]
Sample = dict[str, float]


async def _drive(probe: Probe, in_flight: int, seconds: float) -> dict[str, float]:
    """`in_flight` workers calling `probe()` back to back; counts what completes after the
    warm-up, and the CPU spent meanwhile."""
    counts = {"probes": 0, "ok": 0}
    loop = asyncio.get_running_loop()
    warm = loop.time() + WARM_UP_S
    end = warm + seconds
    marks: dict[str, float] = {}

    async def worker() -> None:
        while (now := loop.time()) < end:
            ok = await probe()
            if now >= warm:
                counts["probes"] += 1
                counts["ok"] += bool(ok)

    async def mark() -> None:
        await asyncio.sleep(WARM_UP_S)
        marks["cpu"], marks["wall"] = _cpu(), time.perf_counter()

    await asyncio.gather(mark(), *(worker() for _ in range(in_flight)))
    return {**counts, "cpu_s": _cpu() - marks["cpu"], "wall_s": time.perf_counter() - marks["wall"]}


def _tunnelwatch(url: str, ca: str) -> Probe:
    from probe.config import load_config
    from probe.measure.rounds import ProbeContext, measure

    config = Path(tempfile.mkdtemp(prefix="tw-rate-")) / "bench.toml"
    config.write_text(
        f'[vantage]\nname = "bench"\n[probe]\ntimeout_s = 10\nca_file = "{ca}"\n[metrics]\nenabled = false\n'
        f'[[targets]]\nname = "nginx"\ngroup = "control"\nkind = "http"\nurl = "{url}"\n'
        f'[[paths]]\nname = "direct"\nkind = "direct"\nresolver = ["{RESOLVER}"]\n'
    )
    cfg = load_config(config)
    ctx = ProbeContext.build(cfg)
    target, path = cfg.targets[0], cfg.paths[0]

    async def probe() -> bool:
        return (await measure(ctx, target, path, "bench")).ok

    return probe


async def _raw_resolve(name: str) -> str:
    """A and AAAA for `name` asked at once on one UDP socket, as tunnelwatch asks; the first
    IPv4 address."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((RESOLVER, 53))
        asked = set()
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            query = dns.message.make_query(name, rdtype)
            asked.add(query.id)
            sock.send(query.to_wire())
        addresses = []
        async with asyncio.timeout(5):
            while asked:
                reply = dns.message.from_wire(await loop.sock_recv(sock, 4096))
                asked.discard(reply.id)
                addresses += [r.address for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for r in rrset]
    return str(addresses[0])


def _raw(url: str, ca: str) -> Probe:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 0
    context = ssl.create_default_context(cafile=ca) if parts.scheme == "https" else None
    if context:  # as tunnelwatch's (probe/measure/rounds.py): the same verification, SNI and ALPN
        context.set_alpn_protocols(["http/1.1"])
    named = not host.replace(".", "").isdigit()
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: raw\r\nConnection: close\r\n\r\n".encode()

    async def probe() -> bool:
        address = await _raw_resolve(host) if named else host
        reader, writer = await asyncio.open_connection(
            address, port, ssl=context, server_hostname=host if context else None
        )
        writer.write(request)
        line = await reader.readline()
        writer.transport.abort()
        return line.startswith(b"HTTP/1.1 200")

    return probe


def resolver_socket(
    sockets: dict[asyncio.AbstractEventLoop, socket.socket],
    loop: asyncio.AbstractEventLoop,
    readable: Callable[[socket.socket], None],
) -> socket.socket:
    """The raw lookups' UDP socket to the resolver for this event loop (one per loop), made once:
    non-blocking, with the kernel's arrival times, `readable` called when answers wait."""
    from probe.measure.conn import SO_TIMESTAMPNS

    sock = sockets[loop] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.connect((RESOLVER, 53))
    loop.add_reader(sock.fileno(), readable, sock)
    return sock


def lean_lookup() -> Callable[[], Awaitable[list[str]]]:
    """The least a lookup of NAME can be in Python on this machine however its code is written
    (the floor of tunnelwatch's lookup): one connected UDP socket for all lookups of a loop with
    one reader, A and AAAA sent with ids popped from one os.urandom read, one future and one
    timer per lookup, each answer handed on by its id with its SO_TIMESTAMPNS time, each record
    stepped over with one struct unpack, the A records' text dnspython's inet_ntoa. Nothing
    else: no question check, no retry, no TCP, no record of the answers. The A addresses."""
    import os
    import struct

    import dns.ipv4
    import dns.name

    from probe.measure.conn import ANCILLARY_BYTES, TIMESPEC

    u16, header, record = struct.Struct("!H"), struct.Struct("!HHHHHH"), struct.Struct("!HHIH")
    queries = [dns.message.make_query(NAME, kind, use_edns=0, payload=1232).to_wire()[2:] for kind in ("A", "AAAA")]
    question_end = 12 + len(dns.name.from_text(NAME).to_digestable()) + 4
    waiting: dict[int, tuple[asyncio.Future[None], list[tuple[int, list[str]]]]] = {}
    sockets: dict[asyncio.AbstractEventLoop, socket.socket] = {}  # one per event loop
    ids: list[int] = []

    def readable(sock: socket.socket) -> None:
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(65536, ANCILLARY_BYTES)
            except BlockingIOError:
                return
            seconds, nanoseconds = TIMESPEC.unpack(ancillary[0][2])
            query_id, _, _, answers, authority, additional = header.unpack_from(data)
            entry = waiting.pop(query_id, None)
            if entry is None:
                continue
            future, got = entry
            at = question_end
            addresses = []
            for _ in range(answers + authority + additional):
                at += 1 if data[at] == 0 else 2
                kind, _, _, length = record.unpack_from(data, at)
                at += 10
                if kind == 1:
                    addresses.append(dns.ipv4.inet_ntoa(data[at : at + length]))
                at += length
            got.append((seconds * 1_000_000_000 + nanoseconds, addresses))
            if len(got) == 2 and not future.done():
                future.set_result(None)

    async def lookup() -> list[str]:
        loop = asyncio.get_running_loop()
        sock = sockets.get(loop) or resolver_socket(sockets, loop, readable)
        future: asyncio.Future[None] = loop.create_future()
        got: list[tuple[int, list[str]]] = []
        for query in queries:
            if not ids:
                ids.extend(struct.unpack("!2048H", os.urandom(4096)))
            query_id = ids.pop()
            while query_id in waiting:  # one id per query in flight, or an answer goes to the wrong lookup
                query_id = ids.pop() if ids else u16.unpack(os.urandom(2))[0]
            waiting[query_id] = (future, got)
            sock.send(u16.pack(query_id) + query)
        timer = loop.call_later(5, future.cancel)
        await future
        timer.cancel()
        return [address for _, addresses in got for address in addresses]

    return lookup


def _floor_lookup_then_tunnelwatch(url: str, ca: str) -> Probe:
    """The floor of a named probe for tunnelwatch: the lean lookup of the name, then
    tunnelwatch's own probe of the address it gave (the same URL with the IP literal)."""
    parts = urlsplit(url)
    literal = _tunnelwatch(url.replace(parts.hostname or "", LOOPBACK, 1), ca)
    lookup = lean_lookup()

    async def probe() -> bool:
        if (await lookup()) != [LOOPBACK]:
            return False
        return await literal()

    return probe


def client(name: str, url: str, ca: str, in_flight: int, seconds: float) -> None:
    """The child process: drive one client, print its figures as JSON."""
    import uvloop

    from probe.measure.rounds import run_loop

    if name == FLOOR_LOOKUP:
        probe = _floor_lookup_then_tunnelwatch(url, ca)
    else:
        probe = _tunnelwatch(url, ca) if name.startswith("tunnelwatch") else _raw(url, ca)
    run = {"tunnelwatch": run_loop, "raw asyncio + uvloop": uvloop.run}.get(name, asyncio.run)
    print(json.dumps(run(_drive(probe, in_flight, seconds))))


def _child(name: str, url: str, ca: Path, in_flight: int, seconds: float) -> dict[str, float]:
    command = [sys.executable, __file__, "--client", name, "--url", url, "--ca", str(ca)]
    command += ["--in-flight", str(in_flight), "--seconds", str(seconds)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} on {url} failed: {result.stderr}")
    return cast(Sample, json.loads(result.stdout.splitlines()[-1]))


BLACKBOX_CONFIG = """modules:
  http_2xx:
    prober: http
    timeout: 10s
    http:
      preferred_ip_protocol: ip4
      tls_config:
        ca_file: {ca}
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
    probes = rate * seconds
    # /probe answers 200 whether the probe succeeded or not: probe_success says which. One
    # probe of the target alone tells whether this target works at all.
    with urllib.request.urlopen(probe_url, timeout=30) as answer:
        ok = b"\nprobe_success 1" in answer.read()
    return {"probes": probes, "ok": probes if ok else 0, "cpu_s": cpu_seconds(pid) - cpu, "wall_s": seconds}


def _blackbox_command(tmp: Path, exporter: int) -> list[str]:
    """The exporter in a mount namespace of its own, /etc/resolv.conf naming the dnsmasq."""
    (tmp / "resolv.conf").write_text(f"nameserver {RESOLVER}\n")
    exe = shutil.which("prometheus-blackbox-exporter") or "prometheus-blackbox-exporter"
    return [
        "unshare",
        "-m",
        "sh",
        "-c",
        'mount --bind "$0" /etc/resolv.conf && exec "$@"',
        str(tmp / "resolv.conf"),
        exe,
        f"--config.file={tmp / 'blackbox.yml'}",
        f"--web.listen-address={LOOPBACK}:{exporter}",
    ]


def site_files(tmp: Path, web: int, tls: int) -> None:
    """A test CA (tmp/ca.pem), a certificate for the name and the loopback address, and an
    nginx config serving http on `web` and https on `tls` (tmp/nginx.conf)."""
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    leaf = ca.issue_cert(NAME, LOOPBACK)
    leaf.private_key_pem.write_to_path(str(tmp / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp / "chain.pem"))
    for pem in leaf.cert_chain_pems[1:]:
        pem.write_to_path(str(tmp / "chain.pem"), append=True)
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, web, (tls, tmp / "chain.pem", tmp / "key.pem")))


def measure_all(seconds: float, runs: int, in_flights: list[int]) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="tw-rate-"))
    web, tls, exporter = free_port(), free_port(), free_port()
    site_files(tmp, web, tls)
    (tmp / "blackbox.yml").write_text(BLACKBOX_CONFIG.format(ca=tmp / "ca.pem"))
    urls = {
        "http IP literal": f"http://{LOOPBACK}:{web}/",
        "http name": f"http://{NAME}:{web}/",
        "https IP literal": f"https://{LOOPBACK}:{tls}/",
        "https name": f"https://{NAME}:{tls}/",
    }
    nginx = [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)]
    figures: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    load_before = _load()
    with (
        dnsmasq(tmp, RESOLVER, 53, f"--address=/{NAME}/{LOOPBACK}", f"--local=/{NAME}/"),
        running(nginx, tmp / "nginx.out", web),
        running(_blackbox_command(tmp, exporter), tmp / "blackbox.out", exporter) as exporter_proc,
    ):
        for _ in range(runs):  # interleaved, so a noisy moment hits every client alike
            for in_flight in in_flights:
                for kind, url in urls.items():
                    for name in _clients(kind):
                        if name == "blackbox_exporter":
                            sample = _blackbox(exporter, exporter_proc.pid, url, in_flight, seconds)
                        else:
                            sample = _child(name, url, tmp / "ca.pem", in_flight, seconds)
                        figures.setdefault((kind, name, in_flight), []).append(sample)
    shutil.rmtree(tmp, ignore_errors=True)
    return _table(figures, in_flights, seconds, runs, (load_before, _load()))


def _load() -> str:
    return ", ".join(Path("/proc/loadavg").read_text().split()[:3])


def _rate(s: dict[str, float]) -> float:
    return s["probes"] / s["wall_s"]


def _cpu_ms(s: dict[str, float]) -> float:
    return 1000 * s["cpu_s"] / max(s["probes"], 1)


def _table(
    figures: dict[tuple[str, str, int], list[dict[str, float]]],
    in_flights: list[int],
    seconds: float,
    runs: int,
    loads: tuple[str, str],
) -> str:
    def ratio(a: list[Sample], b: list[Sample], of: Callable[[Sample], float]) -> float:
        """The median of the per-run ratios (same moment)."""
        return statistics.median(of(x) / of(y) for x, y in zip(a, b, strict=True))

    lines = [
        "| target | client | in flight | probes/s | CPU ms per probe | cores busy | failed | vs blackbox_exporter | "
        "vs raw asyncio + uvloop | CPU vs the IP literal's |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for in_flight in in_flights:
        for kind in KINDS:
            literal = kind.replace("name", "IP literal")
            for name in _clients(kind):
                samples = figures[(kind, name, in_flight)]
                rate = statistics.median(map(_rate, samples))
                cpu = statistics.median(map(_cpu_ms, samples))
                vs_bb = ratio(samples, figures[(kind, "blackbox_exporter", in_flight)], _rate)
                vs_raw = ratio(samples, figures[(kind, "raw asyncio + uvloop", in_flight)], _rate)
                same = name if name != FLOOR_LOOKUP else "tunnelwatch"  # against tunnelwatch's IP literal
                vs_literal = (
                    f"{ratio(samples, figures[(literal, same, in_flight)], _cpu_ms):.2f}x" if kind != literal else ""
                )
                failed = sum(s["probes"] - s["ok"] for s in samples)
                lines.append(
                    f"| {kind} | {name} | {in_flight} | {rate:,.0f} | {cpu:.2f} | {rate * cpu / 1000:.1f} | "
                    f"{failed:,.0f} | {vs_bb:.2f}x | {vs_raw:.2f}x | {vs_literal} |"
                )
    return (
        f"Against nginx on loopback (1 worker; TLS 1.3 with a trustme CA's ECDSA certificate for {NAME} and "
        f"{LOOPBACK}), a fresh connection per probe; names ({NAME}) answered by a dnsmasq on {RESOLVER}:53 "
        f"(`--cache-size=0`), asked afresh by every probe. {seconds:g} s per client after 1 s of warm-up, "
        f"{runs} interleaved run{'s' if runs > 1 else ''}, medians (ratios: median of the per-run ratios). Load average (1, 5, 15 min) "
        f"{loads[0]} before and {loads[1]} after. Targets (issues 7 and 15): tunnelwatch at least 2x "
        "blackbox_exporter's rate (with names too) and 0.3x the raw floor on http, at most 0.5 ms CPU per "
        "http probe; CPU per resolved probe at most 1.25x the IP literal's; https at least 0.9x the raw TLS "
        "floor. Cores busy = rate x CPU per probe: the Python clients run on one core, blackbox_exporter (Go) "
        "on every core it can get, beside nginx, dnsmasq and wrk on this 2-core machine. blackbox_exporter's "
        "failed column counts all of a target's probes when one probe of it alone fails (its /probe answers "
        "200 either way). The name has an A record and no AAAA (NOERROR, no answer); every client asks A "
        "and AAAA (blackbox_exporter 0.23 too, seen in dnsmasq's query log). The raw floor's name is one UDP "
        "socket and dnspython's whole Message (two make_query/to_wire, two from_wire); tunnelwatch's resolver "
        "reads less of each answer than that, so for names the floor is no floor of the resolve step: "
        f'"{FLOOR_LOOKUP}" is (the least lookup, then tunnelwatch\'s IP-literal probe). The raw '
        "TLS client verifies the same CA with the same SNI and ALPN (http/1.1) as tunnelwatch's context.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[100])
    parser.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args.client, args.url, args.ca, args.in_flight[0], args.seconds)
        return
    print(measure_all(args.seconds, args.runs, args.in_flight))


if __name__ == "__main__":
    main()
