"""Instructions per probe, counted by valgrind's callgrind: steady whatever the machine's load.

The probing process runs N probes (IN_FLIGHT at a time) of one kind under callgrind, once with
FEW and once with MANY probes: the difference over MANY - FEW is the user-space instructions of
one probe, start-up and imports left out. Kinds: the probe mix of bench/probe_rate.py (http and
https, to the IP literal and to the name, tunnelwatch's real `measure`), a lookup of the name
alone (probe/measure/dns.py's `lookup`, as an http probe of the name does it), the least a
lookup can be in Python (`raw lookup`: one shared socket, a future per lookup, dnspython's
wire parser reading the records; the floor of tunnelwatch's; `lean raw lookup`: the same with
the ids drawn 2,048 at a time and the records stepped over by struct, no Parser), and the raw asyncio + uvloop TLS
client of bench/probe_rate.py (its floor). The name is answered by a
dnsmasq on RESOLVER:53 (`--cache-size=0`), as in bench/probe_rate.py.

Usage: .venv/bin/python bench/probe_instructions.py [--kinds lookup "http IP literal" ...]
        [--few 200] [--many 1200] [--in-flight 10]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import probe_rate  # noqa: E402
from bench.daemon_load import dnsmasq  # noqa: E402
from tests.servers import LOOPBACK, free_port, running  # noqa: E402

RESOLVER = "127.0.157.53"  # not probe_rate's, so both can run at once
NAME = probe_rate.NAME
KINDS = (
    "lookup",
    "raw lookup",
    "lean raw lookup",
    "http IP literal",
    "http name",
    "https IP literal",
    "https name",
    "raw https IP literal",
)


def _lookup_probe() -> probe_rate.Probe:
    from probe.config import PathSpec
    from probe.measure.dns import lookup, resolver_for
    from probe.model import Trace

    resolver = resolver_for(PathSpec(name="direct", kind="direct", resolver=[RESOLVER]))

    async def probe() -> bool:
        return bool(await lookup(resolver, NAME, Trace()))

    return probe


def _raw_lookup_probe() -> probe_rate.Probe:
    """The least a lookup can be in Python on uvloop, the floor of tunnelwatch's: one connected
    UDP socket for all lookups with one reader, A and AAAA sent with random ids, one future per
    lookup, each answer handed on by its id with its SO_TIMESTAMPNS time and its records read
    with dnspython's wire parser (the A addresses kept). Nothing else: no timeout but one timer,
    no question check, no retry, no TCP, no record of the answers."""
    import os
    import struct

    import dns.ipv4
    import dns.message
    import dns.name
    import dns.wire

    from probe.measure.conn import ANCILLARY_BYTES, TIMESPEC

    u16 = struct.Struct("!H")
    queries = [dns.message.make_query(NAME, kind, use_edns=0, payload=1232).to_wire() for kind in ("A", "AAAA")]
    question_end = 12 + len(dns.name.from_text(NAME).to_digestable()) + 4
    waiting: dict[int, tuple[asyncio.Future[None], list[tuple[int, list[str]]]]] = {}
    sockets: dict[asyncio.AbstractEventLoop, socket.socket] = {}  # one per event loop

    def readable(sock: socket.socket) -> None:
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(65536, ANCILLARY_BYTES)
            except BlockingIOError:
                return
            seconds, nanoseconds = TIMESPEC.unpack(ancillary[0][2])
            entry = waiting.pop(u16.unpack_from(data)[0], None)
            if entry is None:
                continue
            future, got = entry
            parser = dns.wire.Parser(data, question_end)
            addresses = []
            for _ in range(sum(struct.unpack_from("!HHH", data, 6))):
                parser.seek(parser.current + (1 if data[parser.current] == 0 else 2))
                kind, _, _, length = parser.get_struct("!HHIH")
                if kind == 1:
                    addresses.append(dns.ipv4.inet_ntoa(parser.get_bytes(length)))
                else:
                    parser.seek(parser.current + length)
            got.append((seconds * 1_000_000_000 + nanoseconds, addresses))
            if len(got) == 2 and not future.done():
                future.set_result(None)

    async def probe() -> bool:
        loop = asyncio.get_running_loop()
        sock = sockets.get(loop) or probe_rate.resolver_socket(sockets, loop, readable)
        future: asyncio.Future[None] = loop.create_future()
        got: list[tuple[int, list[str]]] = []
        for query in queries:
            query_id = u16.unpack(os.urandom(2))[0]
            while query_id in waiting:  # one id per query in flight, or an answer goes to the wrong lookup
                query_id = u16.unpack(os.urandom(2))[0]
            waiting[query_id] = (future, got)
            sock.send(u16.pack(query_id) + query[2:])
        timer = loop.call_later(5, future.cancel)
        await future
        timer.cancel()
        return any(addresses for _, addresses in got)

    return probe


def child(kind: str, url: str, ca: str, probes: int, in_flight: int) -> None:
    """Run `probes` probes of `kind`, `in_flight` at a time, on uvloop."""
    import uvloop

    probe_rate.RESOLVER = RESOLVER
    if kind == "lookup":
        probe = _lookup_probe()
    elif kind == "raw lookup":
        probe = _raw_lookup_probe()
    elif kind == "lean raw lookup":
        lean = probe_rate.lean_lookup()

        async def probe() -> bool:
            return bool(await lean())

    elif kind.startswith("raw "):
        probe = probe_rate._raw(url, ca)
    else:
        probe = probe_rate._tunnelwatch(url, ca)
    left = [probes]
    failed = [0]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            failed[0] += not await probe()

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(in_flight)))

    uvloop.run(main())
    if failed[0]:
        raise SystemExit(f"{failed[0]} of {probes} probes failed")


def _instructions(kind: str, url: str, ca: Path, probes: int, in_flight: int, out: Path) -> int:
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__]
    command += ["--child", kind, "--url", url, "--ca", str(ca), "--probes", str(probes), "--in-flight", str(in_flight)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{kind}: {result.stderr[-2000:]}")
    match = re.search(r"Collected : (\d+)", result.stderr)
    if not match:
        raise RuntimeError(f"no count from callgrind: {result.stderr[-2000:]}")
    return int(match.group(1))


def measure(kinds: list[str], few: int, many: int, in_flight: int, keep: Path | None) -> list[tuple[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="tw-instr-"))
    web, tls = free_port(), free_port()
    probe_rate.site_files(tmp, web, tls)
    urls = {
        "lookup": "",
        "raw lookup": "",
        "lean raw lookup": "",
        "http IP literal": f"http://{LOOPBACK}:{web}/",
        "http name": f"http://{NAME}:{web}/",
        "https IP literal": f"https://{LOOPBACK}:{tls}/",
        "https name": f"https://{NAME}:{tls}/",
        "raw https IP literal": f"https://{LOOPBACK}:{tls}/",
    }
    nginx = [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)]
    counts = []
    with (
        dnsmasq(tmp, RESOLVER, 53, f"--address=/{NAME}/{LOOPBACK}", f"--local=/{NAME}/"),
        running(nginx, tmp / "nginx.out", web),
    ):
        for kind in kinds:
            slug = kind.replace(" ", "-")
            low = _instructions(kind, urls[kind], tmp / "ca.pem", few, in_flight, tmp / f"{slug}-few.out")
            out = (keep / f"{slug}.callgrind") if keep else tmp / f"{slug}-many.out"
            high = _instructions(kind, urls[kind], tmp / "ca.pem", many, in_flight, out)
            counts.append((kind, (high - low) / (many - few)))
    shutil.rmtree(tmp, ignore_errors=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--few", type=int, default=200)
    parser.add_argument("--many", type=int, default=1200)
    parser.add_argument("--in-flight", type=int, default=10)
    parser.add_argument("--keep", type=Path, help="a directory for the MANY runs' callgrind files")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    parser.add_argument("--probes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.url, args.ca, args.probes, args.in_flight)
        return
    print("| probe | instructions per probe (M) |\n|---|---|")
    for kind, count in measure(args.kinds, args.few, args.many, args.in_flight, args.keep):
        print(f"| {kind} | {count / 1e6:.3f} |")


if __name__ == "__main__":
    main()
