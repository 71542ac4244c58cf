"""An HTTP proxy on loopback whose connections leave through one of the config's paths
(`alerts.via`): the notifications' way past a censor that blocks Telegram or the mail server.

Apprise's services speak HTTP through `requests`, which can use an HTTP proxy but neither
SOCKS (without PySocks) nor a bind address; the proxy here takes `CONNECT host:port` (HTTPS,
and SMTP: probe/daemon/delivery.py) and plain `GET http://host/...` requests (HTTP), and
carries each connection through the path (probe/measure/paths.py), as the fleet's uplink does
(probe/fleet/uplink.py). Names are resolved by the path (a SOCKS proxy's remote DNS included),
not on the vantage point. It listens on 127.0.0.1 only, on a port of the kernel's choice,
and takes only requests that carry its random password (`proxy_url`): another program on
the machine cannot use it to reach the world through the tunnel.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import secrets
from urllib.parse import urlsplit

from probe.config import PathSpec
from probe.fleet.uplink import carry
from probe.measure.paths import open_stream
from probe.model import Trace

log = logging.getLogger("tunnelwatch.daemon")
RELAY_HOST = "127.0.0.1"
CONNECT_TIMEOUT_S = 30.0
MAX_HEAD = 64 * 1024
HOP_BY_HOP = (b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive")
USER = "tunnelwatch"


class ProxyRelay:
    def __init__(self, path: PathSpec) -> None:
        self.path = path
        self._server: asyncio.Server | None = None
        self._password = secrets.token_urlsafe(18)
        self._credentials = b"Basic " + base64.b64encode(f"{USER}:{self._password}".encode())
        self.proxy_url = ""  # http://user:password@host:port once started

    async def start(self) -> str:
        """Listen; the proxy's URL, with its password."""
        self._server = await asyncio.start_server(self._serve, RELAY_HOST, 0, limit=MAX_HEAD)
        port = self._server.sockets[0].getsockname()[1]
        self.proxy_url = f"http://{USER}:{self._password}@{RELAY_HOST}:{port}"
        return self.proxy_url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CONNECT_TIMEOUT_S)
            request, _, headers = head.partition(b"\r\n")
            method, target, version = request.split(b" ", 2)
            host, port, first = _destination(method, target.decode("ascii"), version, headers)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, UnicodeDecodeError):
            await _answer(writer, b"400 Bad Request", "not a proxy request")
            return
        if not hmac.compare_digest(_header(headers, b"proxy-authorization"), self._credentials):
            await _answer(writer, b"407 Proxy Authentication Required", "the notifier's password, please")
            return
        try:
            conn = await asyncio.wait_for(open_stream(self.path, host, port, Trace()), CONNECT_TIMEOUT_S)
        except Exception as exc:  # the path failed (ProbeFailure, OSError, a timeout): a 502 that says why
            why = f"{host}:{port} through {self.path.name}: {exc or type(exc).__name__}"
            log.debug("notification relay: %s", why)
            await _answer(writer, b"502 Bad Gateway", why)
            return
        if first is None:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            await conn.send(first)
        await carry(reader, writer, conn)


def _destination(method: bytes, target: str, version: bytes, headers: bytes) -> tuple[str, int, bytes | None]:
    """Where a proxy request goes, and what to send there first: nothing for CONNECT, the
    request in origin form (closed after one answer) for a plain HTTP one."""
    if method == b"CONNECT":
        host, _, port = target.rpartition(":")
        return host.strip("[]"), int(port), None
    url = urlsplit(target)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(target)
    origin = (url.path or "/") + (f"?{url.query}" if url.query else "")
    kept = [
        line for line in headers.split(b"\r\n") if line and line.split(b":", 1)[0].strip().lower() not in HOP_BY_HOP
    ]
    first = b"\r\n".join([method + b" " + origin.encode("ascii") + b" " + version, *kept, b"Connection: close"])
    return url.hostname, url.port or 80, first + b"\r\n\r\n"


def _header(headers: bytes, name: bytes) -> bytes:
    for line in headers.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return b""


async def _answer(writer: asyncio.StreamWriter, status: bytes, why: str) -> None:
    body = why.encode(errors="replace")
    writer.write(
        b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b'Proxy-Authenticate: Basic realm="tunnelwatch"\r\n'
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with contextlib.suppress(OSError):
        await writer.drain()
    writer.close()
