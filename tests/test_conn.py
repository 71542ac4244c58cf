"""The probe's own connection and HTTP: timed by the kernel, framed and decoded as HTTP/1.1 says."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from probe.config import load_config
from probe.measure.rounds import ProbeContext, measure
from probe.model import Measurement
from tests.conftest import DNS, HOST, PAGE, PAGE_TITLE, TLSFiles, write_config
from tests.servers import LOOPBACK, Web


def _probe(tmp_path: Path, url: str, ca_file: Path | None = None, resolver: str = "", hog_ms: float = 0) -> Measurement:
    """Probe `url` directly; with `hog_ms`, another task blocks the event loop in slices of
    that length the whole time, as a burst of busy callbacks would."""
    body = (
        f'[[targets]]\nname = "t"\ngroup = "control"\nkind = "http"\nurl = "{url}"\n'
        f'[[paths]]\nname = "direct"\nkind = "direct"\n{resolver}\n'
    )
    cfg = load_config(write_config(tmp_path, body, ca_file))
    ctx = ProbeContext.build(cfg)

    async def scenario() -> Measurement:
        probe = asyncio.ensure_future(measure(ctx, cfg.targets[0], cfg.paths[0], "conn"))
        while hog_ms and not probe.done():
            time.sleep(hog_ms / 1000)
            await asyncio.sleep(0)
        return await probe

    return asyncio.run(scenario())


def test_phases_are_the_kernels_times_while_the_loop_is_busy(
    tmp_path: Path, web: Web, dns: DNS, tls_files: TLSFiles
) -> None:
    """Every phase completes while the loop is blocked for 30 ms: the loop sees each one late,
    the kernel's timestamps do not."""
    m = _probe(tmp_path, f"https://{HOST}:{web.https}/", tls_files.ca_file, f'resolver = ["{dns.server}"]', hog_ms=30)
    assert m.ok, m.detail
    assert m.total_ms is not None and m.total_ms > 60  # the loop ran late at least twice
    assert m.connect_ms is not None and m.connect_ms < 5
    assert m.tls_ms is not None and m.tls_ms < 15
    assert m.first_byte_ms is not None and m.first_byte_ms < 5
    quiet = _probe(tmp_path, f"https://{HOST}:{web.https}/", tls_files.ca_file, f'resolver = ["{dns.server}"]')
    assert quiet.ok and quiet.total_ms is not None and quiet.total_ms < m.total_ms


def test_a_gzip_body_is_decoded(tmp_path: Path, web: Web) -> None:
    url = f"http://{LOOPBACK}:{web.http}/gz/index.html"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})) as response:
        assert response.headers["Content-Encoding"] == "gzip"  # nginx did compress it
        assert gzip.decompress(response.read()).decode() == PAGE
    m = _probe(tmp_path, url)
    assert m.ok, m.detail
    assert (m.title, m.body_length) == (PAGE_TITLE, len(PAGE.encode()))


@contextmanager
def answering(answer: bytes) -> Iterator[int]:
    """A TCP server on loopback that reads a request, writes `answer` and closes."""
    listener = socket.create_server((LOOPBACK, 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


@pytest.mark.parametrize(
    ("answer", "failure", "title"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<title>to the close</title>", None, "to the close"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n<title>\r\na\r\nok</title>\r\n0\r\n\r\n",
            None,
            "ok",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n<title>short</title>", "eof_error", None),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n<title>", "eof_error", None),
        (b"HTTP/1.1 2xx Fine\r\n\r\n", "http_protocol_error", None),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "http_protocol_error", None),
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!",
            "http_decoding_error",
            None,
        ),
        (
            b"HTTP/1.1 302 Found\r\nLocation: ftp://files.example/\r\nContent-Length: 0\r\n\r\n",
            "http_invalid_redirect_location_host",
            None,
        ),
    ],
    ids=["to-close", "chunked", "short-length", "short-chunks", "bad-status", "not-http", "bad-gzip", "ftp-redirect"],
)
def test_http_framing(tmp_path: Path, answer: bytes, failure: str | None, title: str | None) -> None:
    with answering(answer) as port:
        m = _probe(tmp_path, f"http://{LOOPBACK}:{port}/")
    assert (m.failure, m.failed_operation if failure else None) == (failure, "http_round_trip" if failure else None)
    assert m.title == title
    assert m.first_byte_ms is not None
