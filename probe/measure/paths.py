"""How a probe leaves: direct, SOCKS5, HTTP CONNECT, or bound to a tunnel's address.

`open_stream` returns a connection (probe/measure/conn.py) to host:port through the path, having
recorded each phase in the probe's Trace, each timed by the kernel. A failure of the path itself (bind, proxy
connect, proxy authentication) is raised as a ProbeFailure with that operation, so it is
never mistaken for a failure of the target behind it.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import cast

from probe.config import PathSpec
from probe.errors import ProbeFailure
from probe.measure.conn import Conn
from probe.measure.dns import Resolver, is_ip, lookup, resolver_for
from probe.measure.failures import classify
from probe.measure.sockets import bound_socket, check_bind
from probe.model import BIND, CONNECT, PROXY_AUTH, PROXY_CONNECT, RESOLVE, TLS_HANDSHAKE, Trace

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
    401: ("proxy_auth_failed", PROXY_AUTH),  # some proxies answer as a server would
    407: ("proxy_auth_failed", PROXY_AUTH),
    403: ("proxy_connection_not_allowed", CONNECT),
    504: ("generic_timeout_error", CONNECT),
}
MAX_PROXY_HEADER = 16 * 1024
RDNs = tuple[tuple[tuple[str, str], ...], ...]  # a certificate's subject or issuer, as getpeercert() has it
STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?\r\n")


async def _connect(addresses: list[str], port: int, path: PathSpec) -> tuple[Conn, float]:
    """Connect to the first address that answers, with the handshake's time in ms; the last
    error is raised if none does."""
    last: OSError | None = None
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        if path.address and (":" in path.address) != (family == socket.AF_INET6):
            continue  # the bind address cannot reach this family
        sock = bound_socket(family, path)
        try:
            return await Conn.connect(sock, (address, port))
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    if last is None:
        raise ProbeFailure("address_not_available", BIND, f"no address of the bind family in {addresses}")
    raise last


async def _connect_target(path: PathSpec, host: str, port: int, trace: Trace) -> Conn:
    check_bind(path)
    addresses = await lookup(resolver_for(path), host, trace)
    trace.operation = CONNECT
    conn, connect_ms = await _connect(addresses, port, path)
    trace.phase("connect", connect_ms)
    trace.fact("peer_address", conn.peer)
    return conn


async def _connect_proxy(path: PathSpec, trace: Trace) -> tuple[Conn, float]:
    """TCP to the proxy itself, with the handshake's time; any failure here is the path's."""
    trace.operation = PROXY_CONNECT
    try:
        addresses = await lookup(SYSTEM_RESOLVER, path.host or "", Trace())
        return await _connect(addresses, path.port or 0, path)
    except ProbeFailure as exc:
        if exc.operation != RESOLVE:
            raise
        raise ProbeFailure(exc.failure, PROXY_CONNECT, f"proxy {path.host}:{path.port}: {exc}") from exc
    except OSError as exc:
        raise ProbeFailure(classify(exc), PROXY_CONNECT, f"proxy {path.host}:{path.port}: {exc}") from exc


async def _socks5(path: PathSpec, host: str, port: int, trace: Trace) -> Conn:
    """The proxy phase is the TCP handshake plus the method negotiation (and authentication);
    the connect phase is the CONNECT request's round trip through the proxy."""
    conn, proxy_ms = await _connect_proxy(path, trace)
    try:
        creds = (path.username, path.password)
        method = 2 if path.username else 0
        await conn.send(bytes([5, 1, method]))
        version, chosen = await conn.readexactly(2)
        proxy_ms += conn.answer_ms()
        if version != 5:
            raise ProbeFailure("proxy_protocol_error", PROXY_CONNECT, f"not a SOCKS5 server (version {version})")
        if chosen != method:
            raise ProbeFailure("proxy_auth_failed", PROXY_AUTH, f"proxy refused auth method {method} (chose {chosen})")
        if method == 2:
            trace.operation = PROXY_AUTH
            user, password = (c.get_secret_value().encode() if c else b"" for c in creds)
            await conn.send(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
            _, status = await conn.readexactly(2)
            if status != 0:
                raise ProbeFailure("proxy_auth_failed", PROXY_AUTH, "proxy rejected the username or password")
            proxy_ms += conn.answer_ms()
        trace.phase("proxy", proxy_ms)
        if path.remote_dns or is_ip(host):
            address = host.strip("[]")
        else:
            address = (await lookup(resolver_for(path), host, trace))[0]
        trace.operation = CONNECT
        await conn.send(_socks_request(address, port))
        _, reply, _, atyp = await conn.readexactly(4)
        if reply != 0:
            failure = SOCKS_REPLIES.get(reply, "proxy_protocol_error")
            raise ProbeFailure(failure, CONNECT, f"SOCKS5 reply {reply} for {host}:{port}")
        trace.phase("connect", conn.answer_ms())
        size = {1: 4, 4: 16}.get(atyp) or (await conn.readexactly(1))[0]
        await conn.readexactly(size + 2)
        return conn
    except BaseException:
        conn.close()
        raise


def _socks_request(address: str, port: int) -> bytes:
    if is_ip(address):
        packed = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        atyp = 4 if len(packed) == 16 else 1
        return bytes([5, 1, 0, atyp]) + packed + struct.pack("!H", port)
    name = address.encode("idna")
    return bytes([5, 1, 0, 3, len(name)]) + name + struct.pack("!H", port)


async def _http_connect(path: PathSpec, host: str, port: int, trace: Trace) -> Conn:
    conn, proxy_ms = await _connect_proxy(path, trace)
    try:
        trace.phase("proxy", proxy_ms)
        trace.operation = CONNECT
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if path.username and path.password:
            token = f"{path.username.get_secret_value()}:{path.password.get_secret_value()}"
            lines.append("Proxy-Authorization: Basic " + base64.b64encode(token.encode()).decode())
        await conn.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            head = await conn.readuntil(b"\r\n\r\n", MAX_PROXY_HEADER)
        except ValueError as exc:
            raise ProbeFailure(
                "proxy_response_too_large", PROXY_CONNECT, f"no end of the proxy's answer in {MAX_PROXY_HEADER} bytes"
            ) from exc
        status_line = head.split(b"\r\n", 1)[0]
        if not (match := STATUS_LINE.match(head)):
            raise ProbeFailure(
                "proxy_protocol_error", PROXY_CONNECT, f"not an HTTP proxy's answer: {status_line[:80]!r}"
            )
        status = int(match.group(1))
        if status // 100 != 2:
            failure, operation = CONNECT_STATUS.get(status, ("proxy_connect_failed", CONNECT))
            raise ProbeFailure(failure, operation, f"proxy answered {status_line[:200]!r} to CONNECT {authority}")
        trace.phase("connect", conn.answer_ms())
        return conn
    except BaseException:
        conn.close()
        raise


async def open_stream(path: PathSpec, host: str, port: int, trace: Trace) -> Conn:
    """A TCP connection to host:port through the path."""
    if path.kind == "socks5":
        return await _socks5(path, host, port, trace)
    if path.kind == "http":
        return await _http_connect(path, host, port, trace)
    return await _connect_target(path, host, port, trace)


async def start_tls(conn: Conn, context: ssl.SSLContext, sni: str, trace: Trace) -> None:
    """Upgrade the connection to TLS in place, recording the handshake time and what it showed."""
    trace.operation = TLS_HANDSHAKE
    try:
        trace.phase("tls", await conn.start_tls(context, sni))
    except ssl.SSLCertVerificationError:
        trace.fact("tls_verified", False)
        raise
    if (tls := conn.ssl_object) is not None:  # the session the handshake set up
        trace.fact("tls_version", tls.version())
        trace.fact("tls_verified", context.verify_mode == ssl.CERT_REQUIRED)
        for name, value in _verified_facts(tls).items():
            trace.fact(name, value)


_CERT_FACTS: dict[bytes, dict[str, object]] = {}  # by the certificate's DER bytes
MAX_CERT_FACTS = 1024


def _verified_facts(tls: ssl.SSLObject) -> dict[str, object]:
    """The facts of the certificate a handshake showed, read once per certificate (its bytes):
    getpeercert's dictionary and its dates cost more than the handshake's own Python."""
    der = tls.getpeercert(binary_form=True) or b""
    facts = _CERT_FACTS.get(der)
    if facts is None:
        scratch = Trace()
        _certificate_facts(tls.getpeercert(), scratch)
        if len(_CERT_FACTS) >= MAX_CERT_FACTS:
            _CERT_FACTS.clear()
        facts = _CERT_FACTS[der] = scratch.facts
    return facts


def _certificate_facts(cert: Mapping[str, object] | None, trace: Trace) -> None:
    """Subject, issuer and expiry of a verified certificate (getpeercert's dictionary)."""
    if not cert:
        return
    trace.fact("cert_subject", _name(cast(RDNs, cert.get("subject", ()))))
    trace.fact("cert_issuer", _name(cast(RDNs, cert.get("issuer", ()))))
    if isinstance(not_after := cert.get("notAfter"), str):
        trace.fact("cert_not_after", datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), UTC))


def _name(rdns: RDNs) -> str:
    return ", ".join(f"{key}={value}" for rdn in rdns for key, value in rdn)
