"""Hostile servers on loopback: what a censor, or a site on the target list, can answer.

Run as a process of its own (`python -m tests.hostile`), so the bytes it streams at full
speed do not share a GIL with the probe under test. It listens on one HTTP port (the
behaviour chosen by the request's path) and one port per proxy behaviour, and prints the
ports as one JSON line when it is ready.
"""

from __future__ import annotations

import asyncio
import json
import sys
import zlib
from collections.abc import Awaitable, Callable

CHUNK = 64 * 1024
Reply = Callable[[asyncio.StreamWriter], Awaitable[None]]


async def forever(writer: asyncio.StreamWriter, head: bytes, unit: bytes) -> None:
    """`head`, then `unit` repeated at full speed until the peer goes away."""
    writer.write(head)
    block = unit * max(1, CHUNK // len(unit))
    while True:
        await writer.drain()
        writer.write(block)


async def drip(writer: asyncio.StreamWriter, head: bytes, unit: bytes) -> None:
    """Slowloris: a byte every 50 ms, never finishing."""
    writer.write(head)
    while True:
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(unit)


def _empty_gzip_blocks() -> bytes:
    """A gzip stream's header and then deflate blocks that decode to nothing, forever."""
    compressor = zlib.compressobj(wbits=31)
    start = compressor.compress(b"")
    return start + compressor.flush(zlib.Z_FULL_FLUSH)


OK_HEAD = b"HTTP/1.1 200 OK\r\n"
CHUNKED = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
HTTP_REPLIES: dict[str, Reply] = {
    "/header-forever": lambda w: forever(w, OK_HEAD + b"X: ", b"a"),
    "/status-forever": lambda w: forever(w, b"HTTP/1.1 200 ", b"O"),
    "/many-headers": lambda w: forever(w, OK_HEAD, b"X-Many: v\r\n"),
    "/chunk-size-forever": lambda w: forever(w, CHUNKED, b"0"),
    "/chunk-extension-forever": lambda w: forever(w, CHUNKED + b"1;x=", b"a"),
    "/trailers-forever": lambda w: forever(w, CHUNKED + b"0\r\n", b"T: v\r\n"),
    "/tiny-chunks-forever": lambda w: forever(w, CHUNKED, b"1\r\na\r\n"),
    "/body-forever": lambda w: forever(w, OK_HEAD + b"\r\n", b"a"),
    "/gzip-nothing-forever": lambda w: forever(
        w,
        OK_HEAD + b"Content-Encoding: gzip\r\n\r\n" + _empty_gzip_blocks(),
        zlib.compressobj(wbits=-15).flush(zlib.Z_FULL_FLUSH),
    ),
    "/slowloris": lambda w: drip(w, OK_HEAD, b"X"),
}
PROXY_REPLIES: dict[str, Reply] = {
    "connect-header-forever": lambda w: forever(w, b"HTTP/1.1 200 Connection established\r\nX: ", b"a"),
    "connect-401": lambda w: _send(w, b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"),
    "connect-garbage": lambda w: _send(w, b"\x16\x03\x01 garbage, not HTTP\r\n\r\n"),
    "socks-garbage-forever": lambda w: forever(w, b"", b"\xff"),
}


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()
    await asyncio.sleep(3600)


def _serving(
    choose: Callable[[bytes], Reply],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.read(65536)
            await choose(first)(writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    return handle


def _http_reply(request: bytes) -> Reply:
    parts = request.split(b" ", 2)
    path = parts[1].decode("latin-1") if len(parts) > 1 else "/"
    return HTTP_REPLIES.get(path, lambda w: _send(w, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))


async def main() -> None:
    servers = {"http": await asyncio.start_server(_serving(_http_reply), "127.0.0.1", 0)}
    for name, reply in PROXY_REPLIES.items():
        servers[name] = await asyncio.start_server(_serving(lambda _, r=reply: r), "127.0.0.1", 0)
    ports = {name: server.sockets[0].getsockname()[1] for name, server in servers.items()}
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
