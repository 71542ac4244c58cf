"""HTTP GET through a path, on a fresh connection for every request.

The probe drives HTTP/1.1 itself over the path's connection (probe/measure/conn.py): it writes one
request, parses the answer with httptools (llhttp, in C), follows redirects and decodes
gzip or deflate bodies. httpx's layers cost ten times the CPU of the probe's own work and
time the answer from a busy event loop (bench/RESULTS.md); httpx stays for what it does
well here: parsing URLs, joining redirect locations and encoding international names.
"""

from __future__ import annotations

import functools
import hashlib
import html
import re
import ssl
import zlib
from typing import Any, NamedTuple

import httptools
import httpx

from probe.config import PathSpec, ProbeSettings, Target
from probe.errors import ProbeFailure
from probe.measure.conn import Conn
from probe.measure.dns import is_ip
from probe.measure.paths import open_stream, start_tls
from probe.model import HTTP_ROUND_TRIP, Trace

MAX_REDIRECTS = 10
REDIRECTS = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
HOSTNAME = re.compile(
    r"^(?=.{1,253}\.?$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$"
)
TITLE = re.compile(rb"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
# Content-Encoding -> zlib window bits (31: gzip; 47: zlib or gzip, told apart by the header).
DECODERS = {b"gzip": 31, b"x-gzip": 31, b"deflate": 47}
# Bounds on what a server can make the probe read. The status line and headers: 256 KiB, as
# Chromium allows. Everything that is not body (the head, chunk-size lines, extensions,
# trailers): the head's bound, 64 KiB more, and eight bytes per body byte (a stream of
# one-byte chunks needs five). The body: `body_cap_bytes` decoded, and reading stops at
# twice that many bytes on the wire (a compressed stream that decodes to nothing).
MAX_HEAD_BYTES = 256 * 1024
MAX_FRAMING_BYTES = 64 * 1024
FRAMING_PER_BODY_BYTE = 8


class _Response:
    """Collects what httptools parses: headers, the body (decoded, up to a cap), completion."""

    def __init__(self, cap: int) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.cap = cap
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.wire_body = 0  # body bytes as they came on the wire (before decoding)
        self._decoder: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:  # trailers are bounded as framing, not kept
            self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.headers_done = True
        encoding = self.headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding in DECODERS:
            self._decoder = zlib.decompressobj(DECODERS[encoding])

    def on_body(self, data: bytes) -> None:
        self.wire_body += len(data)
        room = self.cap - len(self.body)
        if room <= 0:
            return
        try:
            self.body += self._decoder.decompress(data, room) if self._decoder else data[:room]
        except zlib.error as exc:
            self._decoder = None
            raise ProbeFailure("http_decoding_error", HTTP_ROUND_TRIP, f"undecodable body: {exc}") from exc

    def on_message_complete(self) -> None:
        self.complete = True

    @property
    def framed(self) -> bool:
        """The body's end is announced (length or chunks), so a close before it is an error."""
        return b"content-length" in self.headers or b"chunked" in self.headers.get(b"transfer-encoding", b"").lower()


def _request(url: httpx.URL, user_agent: str) -> bytes:
    return (
        b"GET "
        + url.raw_path
        + b" HTTP/1.1\r\nHost: "
        + url.netloc
        + b"\r\nUser-Agent: "
        + user_agent.encode()
        + b"\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\nConnection: close\r\n\r\n"
    )


def _check_bounds(response: _Response, line_seen: bool, wire: int) -> None:
    """Fail an answer whose head or chunked framing outgrew its bound; `wire` is every byte
    read so far, `line_seen` whether a line had ended among them."""
    if not response.headers_done:
        if wire <= MAX_HEAD_BYTES:
            return
        if not line_seen:
            raise ProbeFailure("http_status_line_too_long", HTTP_ROUND_TRIP, f"no status line in {wire} bytes")
        raise ProbeFailure("http_headers_too_large", HTTP_ROUND_TRIP, f"no end of the headers in {wire} bytes")
    overhead = wire - response.wire_body  # the head and the chunked framing
    if overhead > MAX_HEAD_BYTES + MAX_FRAMING_BYTES + FRAMING_PER_BODY_BYTE * response.wire_body:
        raise ProbeFailure(
            "http_chunk_framing_too_large",
            HTTP_ROUND_TRIP,
            f"{overhead} bytes of head and chunk framing for {response.wire_body} of body",
        )


async def _read_response(conn: Conn, trace: Trace, cap: int) -> _Response:
    response = _Response(cap)
    parser = httptools.HttpResponseParser(response)
    line_seen, wire = False, 0
    while not response.complete and len(response.body) < cap and response.wire_body < 2 * cap:
        data = await conn.recv()
        if not data:
            if not response.headers_done:
                raise ProbeFailure("eof_error", HTTP_ROUND_TRIP, "the server closed the connection without answering")
            if response.framed:
                raise ProbeFailure("eof_error", HTTP_ROUND_TRIP, "the server closed the connection mid-body")
            break  # the body ran to the close, as HTTP/1.1 allows without a length
        trace.phase("first_byte", conn.answer_ms())
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            raise exc.__context__ or exc from None  # our own failure, raised in a callback
        except httptools.HttpParserError as exc:
            raise ProbeFailure("http_protocol_error", HTTP_ROUND_TRIP, f"malformed response: {exc}") from exc
        wire += len(data)
        line_seen = line_seen or b"\n" in data
        _check_bounds(response, line_seen, wire)
    response.status = parser.get_status_code()
    return response


class _Where(NamedTuple):
    """A URL as a request to it needs it, worked out once per target (see _parse)."""

    url: httpx.URL
    text: str  # str(url), the final_url fact
    host: str
    port: int
    https: bool
    request: bytes


def _where(url: httpx.URL, user_agent: str) -> _Where:
    host = url.raw_host.decode("ascii")
    port = url.port or DEFAULT_PORTS[url.scheme]
    return _Where(url, str(url), host, port, url.scheme == "https", _request(url, user_agent))


async def _get(where: _Where, path: PathSpec, trace: Trace, ssl_context: ssl.SSLContext, cap: int) -> _Response:
    conn = await open_stream(path, where.host, where.port, trace)
    try:
        if where.https:
            await start_tls(conn, ssl_context, where.host, trace)
        trace.operation = HTTP_ROUND_TRIP
        await conn.send(where.request)
        return await _read_response(conn, trace, cap)
    finally:
        conn.close()


def _next_url(url: httpx.URL, location: bytes) -> httpx.URL:
    """Where a redirect points; a location no resolver could look up is a finding."""
    try:
        target = url.join(location.decode("latin-1").strip())
    except httpx.InvalidURL as exc:
        raise ProbeFailure(
            "http_invalid_redirect_location_host", HTTP_ROUND_TRIP, f"redirected to {location!r}"
        ) from exc
    host = target.raw_host.decode("ascii")
    if target.scheme not in DEFAULT_PORTS or not (is_ip(host) or HOSTNAME.match(host)):
        raise ProbeFailure("http_invalid_redirect_location_host", HTTP_ROUND_TRIP, f"redirected to {target}")
    return target


@functools.lru_cache(maxsize=4096)  # a target's URL is parsed once, not on every probe
def _parse(url: str, user_agent: str) -> _Where:
    return _where(httpx.URL(url), user_agent)


def _title(body: bytes) -> str | None:
    match = TITLE.search(body)
    if not match:
        return None
    text = html.unescape(match.group(1).decode("utf-8", "replace"))
    return " ".join(text.split())[:200] or None


async def probe_http(
    target: Target, path: PathSpec, trace: Trace, *, settings: ProbeSettings, ssl_context: ssl.SSLContext
) -> None:
    where = _parse(target.url or "", settings.user_agent)
    for _hop in range(MAX_REDIRECTS + 1):
        response = await _get(where, path, trace, ssl_context, settings.body_cap_bytes)
        status, location = response.status, response.headers.get(b"location")
        if status not in REDIRECTS or location is None:
            break
        where = _where(_next_url(where.url, location), settings.user_agent)
    else:
        raise ProbeFailure("http_too_many_redirects", HTTP_ROUND_TRIP, f"more than {MAX_REDIRECTS} redirects")
    body = bytes(response.body)
    title = _title(body)
    trace.fact("status", status)
    trace.fact("final_url", where.text)
    trace.fact("body_length", len(body))
    trace.fact("body_sha256", hashlib.sha256(body).hexdigest())
    trace.fact("title", title)
    if status >= 400:
        raise ProbeFailure("http_status_error", HTTP_ROUND_TRIP, f"HTTP {status}")
    _check_expected(target, title, body)


def _check_expected(target: Target, title: str | None, body: bytes) -> None:
    if target.expect_title and target.expect_title not in (title or ""):
        raise ProbeFailure("http_content_mismatch", HTTP_ROUND_TRIP, f"title {title!r} lacks {target.expect_title!r}")
    if target.expect_body and target.expect_body.encode() not in body:
        raise ProbeFailure("http_content_mismatch", HTTP_ROUND_TRIP, f"body lacks {target.expect_body!r}")
