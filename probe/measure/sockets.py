"""Sockets bound to a path's source address or interface (WireGuard, OpenVPN)."""

from __future__ import annotations

import errno
import socket

from probe.config import PathSpec
from probe.errors import ProbeFailure
from probe.measure.failures import classify
from probe.model import BIND


def bound_socket(family: int, path: PathSpec, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A non-blocking socket bound as the path says; a bind that fails is the path's failure."""
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK)  # no FIONBIO call after socket()
    try:
        if path.interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, path.interface.encode())
        if path.address:
            sock.bind((path.address, 0))
    except OSError as exc:
        sock.close()
        failure = "interface_not_found" if exc.errno == errno.ENODEV else classify(exc)
        raise ProbeFailure(failure, BIND, f"cannot bind to {path.address or path.interface}: {exc}") from exc
    return sock


def check_bind(path: PathSpec) -> None:
    """Fail fast, before any lookup, when the tunnel's address or interface is gone."""
    if path.kind == "bind":
        family = socket.AF_INET6 if path.address and ":" in path.address else socket.AF_INET
        bound_socket(family, path, socket.SOCK_DGRAM).close()
