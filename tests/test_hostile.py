"""What a hostile server can answer, probe by probe: each bounded with its own failure
string, within the probe's timeout, and never holding the event loop."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from probe.config import load_config
from probe.measure.conn import Conn
from probe.measure.http import MAX_HEAD_BYTES
from probe.measure.rounds import ProbeContext, measure
from probe.model import Measurement
from tests.conftest import rows, write_config
from tests.daemonproc import Daemon
from tests.servers import LOOPBACK, Web, stop

TIMEOUT_S = 3
BODY_CAP = 64 * 1024


@pytest.fixture(scope="module")
def hostile() -> Iterator[dict[str, int]]:
    """tests/hostile.py in a process of its own; its ports by behaviour."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.hostile"], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        yield json.loads(proc.stdout.readline())
    finally:
        stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def probe(tmp_path: Path, url: str, path: str = 'kind = "direct"') -> tuple[Measurement, float]:
    body = f'[[targets]]\nname = "t"\ngroup = "blocked"\nkind = "http"\nurl = "{url}"\n[[paths]]\nname = "p"\n{path}\n'
    config = write_config(tmp_path, body, timeout_s=TIMEOUT_S)
    config.write_text(config.read_text().replace("[probe]", f"[probe]\nbody_cap_bytes = {BODY_CAP}"))
    cfg = load_config(config)
    started = time.monotonic()
    m = asyncio.run(measure(ProbeContext.build(cfg), cfg.targets[0], cfg.paths[0], "hostile"))
    return m, time.monotonic() - started


# (server, request path, failure, failed operation)
ANSWERS = [
    ("http", "/header-forever", "http_headers_too_large", "http_round_trip"),
    ("http", "/many-headers", "http_headers_too_large", "http_round_trip"),
    ("http", "/status-forever", "http_status_line_too_long", "http_round_trip"),
    ("http", "/chunk-size-forever", "http_chunk_framing_too_large", "http_round_trip"),
    ("http", "/chunk-extension-forever", "http_chunk_framing_too_large", "http_round_trip"),
    ("http", "/trailers-forever", "http_chunk_framing_too_large", "http_round_trip"),
    ("http", "/slowloris", "generic_timeout_error", "http_round_trip"),
    ("connect-header-forever", "/", "proxy_response_too_large", "proxy_connect"),
    ("connect-401", "/", "proxy_auth_failed", "proxy_auth"),
    ("connect-garbage", "/", "proxy_protocol_error", "proxy_connect"),
    ("socks-garbage-forever", "/", "proxy_protocol_error", "proxy_connect"),
]


@pytest.mark.parametrize(("server", "where", "failure", "operation"), ANSWERS, ids=[f"{a[0]}{a[1]}" for a in ANSWERS])
def test_a_hostile_answer_fails_with_its_own_string_within_the_timeout(
    tmp_path: Path, hostile: dict[str, int], server: str, where: str, failure: str, operation: str
) -> None:
    url = f"http://{LOOPBACK}:{hostile['http']}{where}"
    kind = {"connect": "http", "socks": "socks5"}.get(server.split("-")[0])
    path = f'kind = "{kind}"\nhost = "{LOOPBACK}"\nport = {hostile[server]}' if kind else 'kind = "direct"'
    m, took_s = probe(tmp_path, url, path)
    assert (m.failure, m.failed_operation) == (failure, operation), m.detail
    assert took_s < TIMEOUT_S + 2  # the hard timeout holds, whatever the peer sends


@pytest.mark.parametrize("where", ["/body-forever", "/tiny-chunks-forever", "/gzip-nothing-forever"])
def test_an_endless_body_is_read_up_to_its_bound(tmp_path: Path, hostile: dict[str, int], where: str) -> None:
    """An endless body is the page, cut at the cap (decoded, or twice the cap on the wire);
    one-byte chunks are legal framing, not an attack."""
    m, took_s = probe(tmp_path, f"http://{LOOPBACK}:{hostile['http']}{where}")
    assert m.ok, m.detail
    assert m.body_length == (0 if "gzip" in where else BODY_CAP)
    assert took_s < TIMEOUT_S


def test_headers_just_under_the_bound_are_read(tmp_path: Path) -> None:
    """The bound is not a guess about real sites: 200 KiB of cookies still make a page."""
    from tests.test_conn import answering

    cookies = b"".join(b"Set-Cookie: c%d=%s\r\n" % (i, b"v" * 1000) for i in range(200))
    assert len(cookies) < MAX_HEAD_BYTES
    answer = b"HTTP/1.1 200 OK\r\n" + cookies + b"Content-Length: 20\r\n\r\n<title>big</title>  "
    with answering(answer) as port:
        m, _ = probe(tmp_path, f"http://{LOOPBACK}:{port}/")
    assert m.ok and m.title == "big", m.detail


def test_reading_a_stream_that_always_has_more_gives_the_loop_a_turn() -> None:
    """All of the answer is waiting in the kernel: every read must still let other tasks
    (other probes, the timeout, a signal) run."""
    ours, theirs = socket.socketpair()
    theirs.sendall(b"x" * 150_000)  # fits the socket's buffer, so it is all there at once
    theirs.close()
    ours.setblocking(False)

    async def scenario() -> tuple[int, int]:
        turns, reads = 0, 0

        async def other_task() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        other = asyncio.ensure_future(other_task())
        await asyncio.sleep(0)
        conn = Conn(ours, "peer")
        turns_before = turns
        while await conn.recv():
            reads += 1
        other.cancel()
        conn.close()
        return turns - turns_before, reads

    turns, reads = asyncio.run(scenario())
    assert reads >= 2
    assert turns >= reads


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


HOSTILE_TARGETS = [
    "/header-forever",
    "/many-headers",
    "/status-forever",
    "/chunk-size-forever",
    "/trailers-forever",
    "/slowloris",
    "/body-forever",
    "/gzip-nothing-forever",
]


def test_the_daemon_runs_a_minute_among_hostile_servers(
    tmp_path: Path, hostile: dict[str, int], web: Web, daemons: Callable[..., Daemon]
) -> None:
    """Every hostile answer above, and a proxy that never ends its answer, probed by the
    daemon every 3 s for a minute: the good page keeps its schedule, memory stays flat,
    each hostile target is stored with its failure, and SIGTERM ends it in time."""
    interval_s = 3
    targets = "".join(
        f'[[targets]]\nname = "hostile{where.replace("/", "-")}"\ngroup = "blocked"\nkind = "http"\n'
        f'url = "http://{LOOPBACK}:{hostile["http"]}{where}"\n\n'
        for where in HOSTILE_TARGETS
    )
    body = (
        f'{targets}[[targets]]\nname = "page"\ngroup = "control"\nkind = "http"\nurl = "http://{LOOPBACK}:{web.http}/"\n\n'
        f'[[paths]]\nname = "direct"\nkind = "direct"\n\n'
        f'[[paths]]\nname = "endless-proxy"\nkind = "http"\nhost = "{LOOPBACK}"\nport = {hostile["connect-header-forever"]}\n'
    )
    config = write_config(tmp_path, body, timeout_s=2)
    config.write_text(
        config.read_text().replace("[probe]", f"[probe]\ninterval_s = {interval_s}\nbody_cap_bytes = {BODY_CAP}")
    )
    daemon = daemons(config)
    started = time.monotonic()
    rss: list[tuple[float, float]] = []
    while (elapsed := time.monotonic() - started) < 60:
        assert daemon.proc.poll() is None, daemon.output()
        rss.append((elapsed, _rss_mb(daemon.proc.pid)))
        time.sleep(1)
    stopping = time.monotonic()
    assert daemon.stop(timeout_s=30) == 0, daemon.output()
    assert time.monotonic() - stopping < 15  # the drain waits for probes bounded by their 2 s timeout

    beats = [h for h in daemon.heartbeats() if h["target"] == "page"]
    starts = sorted(h["scheduled_at_ms"] for h in beats)
    assert len(starts) >= 60 // interval_s - 3, starts
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(gap % (interval_s * 1000) == 0 for gap in gaps), starts  # on the grid
    assert sum(gap > interval_s * 1000 for gap in gaps) <= 1, starts  # a frozen daemon misses every round after
    late_ms = sorted(h["started_at_ms"] - h["scheduled_at_ms"] for h in beats)
    assert late_ms[len(late_ms) // 2] < 500 and late_ms[-1] < 2500, late_ms

    settled = max(mb for t, mb in rss if 15 <= t < 30)
    assert max(mb for t, mb in rss if t >= 30) < settled + 20, rss  # flat: no growth with every round

    stored = rows(daemon.db)
    failures = {(r["target"], r["path"]): r["failure"] for r in stored}
    expected = {
        "header-forever": "http_headers_too_large",
        "many-headers": "http_headers_too_large",
        "status-forever": "http_status_line_too_long",
        "chunk-size-forever": "http_chunk_framing_too_large",
        "trailers-forever": "http_chunk_framing_too_large",
        "slowloris": "generic_timeout_error",
        "body-forever": None,
        "gzip-nothing-forever": None,
    }
    for name, failure in expected.items():
        assert failures[(f"hostile-{name}", "direct")] == failure
        assert failures[(f"hostile-{name}", "endless-proxy")] == "proxy_response_too_large"
    assert failures[("page", "direct")] is None
