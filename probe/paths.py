"""How a probe leaves: direct, SOCKS5, HTTP CONNECT, or bound to a tunnel's address.

`open_stream` returns asyncio streams connected to host:port through the path, having
recorded each phase in the probe's Trace. A failure of the path itself (bind, proxy
connect, proxy authentication) is raised as a ProbeFailure with that operation, so it is
never mistaken for a failure of the target behind it.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import struct
import time
from datetime import UTC, datetime

import aiodns.error as ares

from .config import PathSpec
from .dns import Resolver, is_ip, lookup, resolver_for
from .errors import ProbeFailure
from .failures import classify
from .model import BIND, CONNECT, PROXY_AUTH, PROXY_CONNECT, TLS_HANDSHAKE, Trace
from .sockets import bound_socket, check_bind

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

SYSTEM_RESOLVER = Resolver()
SOCKS_REPLIES = {
    1: "proxy_general_failure",
    2: "proxy_connection_not_allowed",
    3: "network_unreachable",
    4: "host_unreachable",
    5: "connection_refused",
    6: "generic_timeout_error",
    7: "proxy_protocol_error",
    8: "proxy_protocol_error",
}
# HTTP CONNECT proxy status -> (failure, operation).
CONNECT_STATUS = {
    407: ("proxy_auth_failed", PROXY_AUTH),
    403: ("proxy_connection_not_allowed", CONNECT),
    504: ("generic_timeout_error", CONNECT),
}
MAX_PROXY_HEADER = 16 * 1024


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


async def _connect(addresses: list[str], port: int, path: PathSpec) -> socket.socket:
    """Connect to the first address that answers; the last error is raised if none does."""
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        if path.address and (":" in path.address) != (family == socket.AF_INET6):
            continue  # the bind address cannot reach this family
        sock = bound_socket(family, path)
        try:
            await loop.sock_connect(sock, (address, port))
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if last is None:
        raise ProbeFailure("address_not_available", BIND, f"no address of the bind family in {addresses}")
    raise last


async def _connect_target(path: PathSpec, host: str, port: int, trace: Trace) -> Streams:
    check_bind(path)
    addresses = await lookup(resolver_for(path), host, trace)
    trace.operation = CONNECT
    started = time.perf_counter()
    sock = await _connect(addresses, port, path)
    trace.phase("connect", _elapsed_ms(started))
    trace.fact("peer_address", sock.getpeername()[0])
    return await asyncio.open_connection(sock=sock)


async def _connect_proxy(path: PathSpec, trace: Trace) -> Streams:
    """TCP to the proxy itself; any failure here is the path's."""
    trace.operation = PROXY_CONNECT
    try:
        addresses = await lookup(SYSTEM_RESOLVER, path.host or "", Trace())
        sock = await _connect(addresses, path.port or 0, path)
        return await asyncio.open_connection(sock=sock)
    except ProbeFailure:
        raise
    except (OSError, ares.DNSError) as exc:
        raise ProbeFailure(classify(exc), PROXY_CONNECT, f"proxy {path.host}:{path.port}: {exc}") from exc


async def _socks5(path: PathSpec, host: str, port: int, trace: Trace) -> Streams:
    started = time.perf_counter()
    reader, writer = await _connect_proxy(path, trace)
    try:
        creds = (path.username, path.password)
        method = 2 if path.username else 0
        writer.write(bytes([5, 1, method]))
        version, chosen = await reader.readexactly(2)
        if version != 5:
            raise ProbeFailure("proxy_protocol_error", PROXY_CONNECT, f"not a SOCKS5 server (version {version})")
        if chosen != method:
            raise ProbeFailure("proxy_auth_failed", PROXY_AUTH, f"proxy refused auth method {method} (chose {chosen})")
        if method == 2:
            trace.operation = PROXY_AUTH
            user, password = (c.get_secret_value().encode() if c else b"" for c in creds)
            writer.write(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
            _, status = await reader.readexactly(2)
            if status != 0:
                raise ProbeFailure("proxy_auth_failed", PROXY_AUTH, "proxy rejected the username or password")
        trace.phase("proxy", _elapsed_ms(started))
        if path.remote_dns or is_ip(host):
            address = host.strip("[]")
        else:
            address = (await lookup(resolver_for(path), host, trace))[0]
        trace.operation = CONNECT
        started = time.perf_counter()
        writer.write(_socks_request(address, port))
        _, reply, _, atyp = await reader.readexactly(4)
        if reply != 0:
            failure = SOCKS_REPLIES.get(reply, "proxy_protocol_error")
            raise ProbeFailure(failure, CONNECT, f"SOCKS5 reply {reply} for {host}:{port}")
        size = {1: 4, 4: 16}.get(atyp) or (await reader.readexactly(1))[0]
        await reader.readexactly(size + 2)
        trace.phase("connect", _elapsed_ms(started))
        return reader, writer
    except BaseException:
        writer.transport.abort()
        raise


def _socks_request(address: str, port: int) -> bytes:
    if is_ip(address):
        packed = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        atyp = 4 if len(packed) == 16 else 1
        return bytes([5, 1, 0, atyp]) + packed + struct.pack("!H", port)
    name = address.encode("idna")
    return bytes([5, 1, 0, 3, len(name)]) + name + struct.pack("!H", port)


async def _http_connect(path: PathSpec, host: str, port: int, trace: Trace) -> Streams:
    started = time.perf_counter()
    reader, writer = await _connect_proxy(path, trace)
    try:
        trace.phase("proxy", _elapsed_ms(started))
        trace.operation = CONNECT
        started = time.perf_counter()
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if path.username and path.password:
            token = f"{path.username.get_secret_value()}:{path.password.get_secret_value()}"
            lines.append("Proxy-Authorization: Basic " + base64.b64encode(token.encode()).decode())
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_PROXY_HEADER:
            raise ProbeFailure("proxy_protocol_error", CONNECT, "proxy sent an oversized header")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if status // 100 != 2:
            failure, operation = CONNECT_STATUS.get(status, ("proxy_connect_failed", CONNECT))
            raise ProbeFailure(failure, operation, f"proxy answered {status_line!r} to CONNECT {authority}")
        trace.phase("connect", _elapsed_ms(started))
        return reader, writer
    except asyncio.LimitOverrunError as exc:
        writer.transport.abort()
        raise ProbeFailure("proxy_protocol_error", CONNECT, "proxy sent an oversized header") from exc
    except BaseException:
        writer.transport.abort()
        raise


async def open_stream(path: PathSpec, host: str, port: int, trace: Trace) -> Streams:
    """A TCP stream to host:port through the path."""
    if path.kind == "socks5":
        return await _socks5(path, host, port, trace)
    if path.kind == "http":
        return await _http_connect(path, host, port, trace)
    return await _connect_target(path, host, port, trace)


async def start_tls(writer: asyncio.StreamWriter, context: ssl.SSLContext, sni: str, trace: Trace) -> None:
    """Upgrade the stream to TLS in place, recording the handshake time and what it showed."""
    trace.operation = TLS_HANDSHAKE
    started = time.perf_counter()
    try:
        await writer.start_tls(context, server_hostname=sni)
    except ssl.SSLCertVerificationError:
        trace.fact("tls_verified", False)
        raise
    trace.phase("tls", _elapsed_ms(started))
    tls = writer.get_extra_info("ssl_object")
    if tls is None:
        return
    trace.fact("tls_version", tls.version())
    trace.fact("tls_verified", context.verify_mode == ssl.CERT_REQUIRED)
    cert = tls.getpeercert()
    if cert:
        trace.fact("cert_subject", _name(cert.get("subject", ())))
        trace.fact("cert_issuer", _name(cert.get("issuer", ())))
        if "notAfter" in cert:
            expiry = ssl.cert_time_to_seconds(cert["notAfter"])
            trace.fact("cert_not_after", datetime.fromtimestamp(expiry, UTC))


def _name(rdns: tuple[tuple[tuple[str, str], ...], ...]) -> str:
    return ", ".join(f"{key}={value}" for rdn in rdns for key, value in rdn)
