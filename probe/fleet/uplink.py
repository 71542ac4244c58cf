"""The forwarder's uplink through a tunnel: when the censor blocks the way to the central
store, uploads can leave through one of the config's paths (a SOCKS or HTTP proxy, a
WireGuard or OpenVPN address) like any probe does.

libpq cannot speak SOCKS or bind to an address, so a relay on loopback accepts its
connection and carries it through the path (probe/measure/paths.py); libpq is told to connect to the
relay (`hostaddr`) while still naming the real host, so TLS verification is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from urllib.parse import urlsplit

from psycopg.conninfo import make_conninfo

from probe.config import PathSpec
from probe.errors import StoreError
from probe.measure.conn import Conn
from probe.measure.paths import open_stream
from probe.model import Trace
from probe.pgurl import postgres_url_problem, redact

log = logging.getLogger(__name__)
RELAY_HOST = "127.0.0.1"


class Uplink:
    """A loopback relay to the central store through `path`, on the daemon's event loop."""

    def __init__(self, url: str, path: PathSpec) -> None:
        if problem := postgres_url_problem(url):  # Python and libpq would read different hosts
            raise StoreError(f"{redact(url)}: cannot reach the central store through {path.name}: its URL {problem}")
        parts = urlsplit(url)
        self.url = url
        self.path = path
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 5432
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """Listen; the conninfo that reaches the central store through the relay."""
        self._server = await asyncio.start_server(self._relay, RELAY_HOST, 0)
        port = self._server.sockets[0].getsockname()[1]
        return make_conninfo(self.url, hostaddr=RELAY_HOST, port=port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            conn = await open_stream(self.path, self.host, self.port, Trace())
        except Exception as exc:  # the path failed: libpq sees the connection close
            log.warning("uplink through %s to %s:%s failed: %s", self.path.name, self.host, self.port, exc)
            writer.close()
            return
        await carry(reader, writer, conn)


async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Conn) -> None:
    """Carry a loopback client's connection through a path's `conn` both ways, until the far
    side is done (a client may keep its own side open) or either side fails; then close both.
    The uplink's relay and the notifications' proxy (probe/daemon/relay.py) share it."""
    outbound = asyncio.ensure_future(_outbound(reader, conn))
    inbound = asyncio.ensure_future(_inbound(conn, writer))
    pumps = [outbound, inbound]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        if not inbound.done() and outbound.exception() is None:
            await asyncio.wait([inbound])
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        conn.close()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _outbound(reader: asyncio.StreamReader, conn: Conn) -> None:
    while data := await reader.read(65536):
        await conn.send(data)
    conn.sock.shutdown(socket.SHUT_WR)  # the client is done


async def _inbound(conn: Conn, writer: asyncio.StreamWriter) -> None:
    while data := await conn.recv():
        writer.write(data)
        await writer.drain()
    writer.write_eof()
