"""Timing truth under load: how far are the connect and first-byte times tunnelwatch reports
from what really happened, with 1, 100 and 500 probes in flight?

A server in its own process (uvloop) answers every request DELAY_MS after it arrived and
records, per request path, how long it really held the answer: from the kernel's arrival
time of the request to the answer's send (the loopback round trip, some 30 microseconds, is
left out). The client is tunnelwatch's real HTTP probe
(`probe.rounds.measure`), each of IN_FLIGHT workers probing its own URL back to back, so the
server's record and the client's Measurement pair up in order. Errors: reported first byte
minus the server's hold time; reported connect time (the truth on loopback is ~0). Every
measurement carries the event loop's lateness while it ran (`loop_lag_ms`, probe/measure/lag.py):
the errors of the probes whose loop ran late are shown apart.

Usage: .venv/bin/python bench/timing_truth.py [--seconds 10] [--in-flight 1 100 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import signal
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.summary import LAG_LIMIT_MS  # noqa: E402
from bench.daemon_load import percentile  # noqa: E402
from probe.measure.conn import SO_TIMESTAMPNS  # noqa: E402
from tests.servers import LOOPBACK, free_port  # noqa: E402

DELAY_MS = 50.0
Sample = tuple[float | None, float | None, float | None]  # connect, first byte, loop lag (ms)


def _serve(port: int, ready: Any, log: Path) -> None:
    """Answer every request DELAY_MS after it arrived; the hold time is the kernel's arrival
    time of the request (SO_TIMESTAMPNS) to the moment the answer is handed to the kernel, so
    a late server loop is part of the truth, not an error of the client."""
    import uvloop

    held: list[tuple[str, float]] = []
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    async def readable(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.add_reader(sock.fileno(), lambda: future.done() or future.set_result(None))
        try:
            await future
        finally:
            loop.remove_reader(sock.fileno())

    async def handle(sock: socket.socket) -> None:
        head, arrived_ns = b"", 0
        while b"\r\n\r\n" not in head:
            await readable(sock)
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16))
            if not data:
                sock.close()
                return
            head += data
            for _, _, payload in ancillary:
                seconds, nanoseconds = struct.unpack("qq", payload)
                arrived_ns = seconds * 1_000_000_000 + nanoseconds
        await asyncio.sleep(DELAY_MS / 1000)
        sent_ns = time.time_ns()
        sock.send(answer)
        held.append((head.split(b" ", 2)[1].decode(), (sent_ns - arrived_ns) / 1e6))
        sock.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server((LOOPBACK, port), backlog=4096)
        listener.setblocking(False)
        ready.set()
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            loop.create_task(handle(sock))

    def dump(*_: object) -> None:
        log.write_text(json.dumps(held))
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, dump)
    uvloop.run(main())


def _client(port: int, in_flight: int, seconds: float) -> dict[str, list[Sample]]:
    from probe.config import load_config
    from probe.measure.rounds import ProbeContext, measure, run_loop

    config = Path(tempfile.mkdtemp(prefix="tw-truth-")) / "bench.toml"
    config.write_text(
        '[vantage]\nname = "bench"\n[probe]\ntimeout_s = 30\n[metrics]\nenabled = false\n'
        + "".join(
            f'[[targets]]\nname = "w{i}"\ngroup = "control"\nkind = "http"\nurl = "http://{LOOPBACK}:{port}/w{i}"\n'
            for i in range(in_flight)
        )
        + '[[paths]]\nname = "direct"\nkind = "direct"\n'
    )
    cfg = load_config(config)
    ctx = ProbeContext.build(cfg)
    path = cfg.paths[0]
    results: dict[str, list[Sample]] = {}

    async def worker(target: Any) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        mine = results.setdefault(f"/{target.name}", [])
        while loop.time() < end:
            m = await measure(ctx, target, path, "truth")
            mine.append((m.connect_ms, m.first_byte_ms, m.loop_lag_ms) if m.ok else (None, None, None))

    async def main() -> None:
        await asyncio.gather(*(worker(t) for t in cfg.targets))

    run_loop(main())  # the daemon's loop
    return results


def _spread(values: list[float]) -> str:
    if not values:
        return "none"
    return f"{percentile(values, 0.5):.2f} / {percentile(values, 0.99):.2f} / {max(values):.2f}"


def _level(in_flight: int, seconds: float) -> str:
    context = multiprocessing.get_context("spawn")
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="tw-truth-")) / "held.json"
    ready = context.Event()
    server = context.Process(target=_serve, args=(port, ready, log))
    server.start()
    ready.wait(30)
    results = _client(port, in_flight, seconds)
    server.terminate()
    server.join(30)
    held: dict[str, list[float]] = {}
    for request_path, ms in json.loads(log.read_text()):
        held.setdefault(request_path, []).append(ms)
    errors: list[float] = []
    connects: list[float] = []
    late_errors: list[float] = []
    failed = count = 0
    for request_path, measured in results.items():
        for (connect, first_byte, lag), truth in zip(measured, held.get(request_path, []), strict=False):
            count += 1
            if first_byte is None or connect is None:
                failed += 1
                continue
            errors.append(first_byte - truth)
            connects.append(connect)
            if lag is not None and lag > LAG_LIMIT_MS:
                late_errors.append(first_byte - truth)
    share = len(late_errors) / max(len(errors), 1)
    return (
        f"| {in_flight} | {count:,} | {failed} | {_spread(errors)} | {_spread(connects)} | {share:.0%} | "
        f"{_spread(late_errors)} |"
    )


def measure_truth(seconds: float, in_flights: list[int]) -> str:
    head = (
        "| in flight | probes | failed | first byte error p50 / p99 / max (ms) | connect p50 / p99 / max (ms) | "
        f"probes while the loop ran over {LAG_LIMIT_MS:g} ms late | their first byte error p50 / p99 / max |\n"
        "|---|---|---|---|---|---|---|"
    )
    rows = "\n".join(_level(n, seconds) for n in in_flights)
    return (
        f"tunnelwatch's HTTP probe against a server holding every answer {DELAY_MS:g} ms (uvloop, its own "
        f"process), {seconds:g} s per level, each worker probing back to back: a closed loop, so the probing "
        "process runs flat out at 100 and 500 in flight. Target: p99 error under 2 ms at 500 in flight. "
        "The probe's phases are the kernel's times (probe/measure/conn.py: TCP_INFO for the handshake, SO_TIMESTAMPNS "
        "for the answer), so they stay true while its event loop runs late; the last columns show the "
        f"probes whose loop was over {LAG_LIMIT_MS:g} ms late (`loop_lag_ms`), the ones a loop-timed probe "
        f"would get wrong.\n\n{head}\n{rows}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 100, 500])
    args = parser.parse_args()
    print(measure_truth(args.seconds, args.in_flight))


if __name__ == "__main__":
    main()
