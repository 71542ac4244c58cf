"""HTTP GET through a path with httpx, on a fresh connection for every request.

httpx handles redirects and the response; the connection under it comes from the
probe's path through httpcore's network-backend seam, so resolution, proxying, binding
and TLS are the same code as the tcp and tls probes and every phase is timed.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpcore
import httpx

from .config import PathSpec, Target
from .dns import is_ip
from .errors import ProbeFailure
from .model import HTTP_ROUND_TRIP, Trace
from .paths import open_stream, start_tls

MAX_REDIRECTS = 10
HOSTNAME = re.compile(r"^(?=.{1,253}\.?$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$")
TITLE = re.compile(rb"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)


class _PathStream(httpcore.AsyncNetworkStream):
    """An httpcore stream over asyncio streams that notes when the first response byte came."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, trace: Trace) -> None:
        self._reader = reader
        self._writer = writer
        self._trace = trace
        self._request_sent_at: float | None = None
        self._first_byte_seen = False

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = await self._reader.read(max_bytes)
        if data and not self._first_byte_seen and self._request_sent_at is not None:
            self._first_byte_seen = True
            self._trace.phase("first_byte", (time.perf_counter() - self._request_sent_at) * 1000)
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._request_sent_at is None:
            self._request_sent_at = time.perf_counter()
        self._writer.write(buffer)
        await self._writer.drain()

    async def aclose(self) -> None:
        self._writer.transport.abort()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        await start_tls(self._writer, ssl_context, server_hostname or "", self._trace)
        self._trace.operation = HTTP_ROUND_TRIP
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "is_readable":
            return self._reader.at_eof()
        return None


class _PathBackend(httpcore.AsyncNetworkBackend):
    """httpcore asks for a TCP connection; the probe's path provides it."""

    def __init__(self, path: PathSpec, trace: Trace) -> None:
        self._path = path
        self._trace = trace

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        reader, writer = await open_stream(self._path, host, port, self._trace)
        self._trace.operation = HTTP_ROUND_TRIP
        return _PathStream(reader, writer, self._trace)

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise NotImplementedError("probes do not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        await self._stream.aclose()


class _PathTransport(httpx.AsyncBaseTransport):
    """httpx on an httpcore pool that keeps no connection alive: every request dials anew."""

    def __init__(self, path: PathSpec, trace: Trace, ssl_context: ssl.SSLContext) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_keepalive_connections=0,
            retries=0,
            network_backend=_PathBackend(path, trace),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._pool.handle_async_request(
            httpcore.Request(
                method=request.method,
                url=httpcore.URL(
                    scheme=request.url.raw_scheme,
                    host=request.url.raw_host,
                    port=request.url.port,
                    target=request.url.raw_path,
                ),
                headers=request.headers.raw,
                content=request.stream,
                extensions=request.extensions,
            )
        )
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


async def _check_location(request: httpx.Request) -> None:
    """A redirect to a host no resolver could look up is a finding, not a DNS failure."""
    host = request.url.host
    if not (is_ip(host) or HOSTNAME.match(host)):
        raise ProbeFailure("http_invalid_redirect_location_host", HTTP_ROUND_TRIP, f"redirected to {request.url}")


def _title(body: bytes) -> str | None:
    match = TITLE.search(body)
    if not match:
        return None
    text = html.unescape(match.group(1).decode("utf-8", "replace"))
    return " ".join(text.split())[:200] or None


async def probe_http(
    target: Target,
    path: PathSpec,
    trace: Trace,
    *,
    ssl_context: ssl.SSLContext,
    user_agent: str,
    body_cap_bytes: int,
    **_: object,
) -> dict[str, Any]:
    transport = _PathTransport(path, trace, ssl_context)
    client = httpx.AsyncClient(
        transport=transport,
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        timeout=None,  # the caller bounds the whole probe with asyncio.timeout
        trust_env=False,
        headers={"User-Agent": user_agent, "Accept": "*/*"},
        event_hooks={"request": [_check_location]},
    )
    async with client:
        async with client.stream("GET", target.url or "") as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk[: body_cap_bytes - len(body)]
                if len(body) >= body_cap_bytes:
                    break
    facts = {
        "status": response.status_code,
        "final_url": str(response.url),
        "body_length": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "title": _title(bytes(body)),
    }
    for name, value in facts.items():
        trace.fact(name, value)
    if response.status_code >= 400:
        raise ProbeFailure("http_status_error", HTTP_ROUND_TRIP, f"HTTP {response.status_code}")
    _check_expected(target, facts["title"], bytes(body))
    return facts


def _check_expected(target: Target, title: str | None, body: bytes) -> None:
    if target.expect_title and target.expect_title not in (title or ""):
        raise ProbeFailure(
            "http_content_mismatch", HTTP_ROUND_TRIP, f"title {title!r} lacks {target.expect_title!r}"
        )
    if target.expect_body and target.expect_body.encode() not in body:
        raise ProbeFailure("http_content_mismatch", HTTP_ROUND_TRIP, f"body lacks {target.expect_body!r}")
