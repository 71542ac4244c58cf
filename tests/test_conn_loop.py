"""A probe's connection on the event loop: one poll handle from connect to close, and nothing
left on the loop after it, whether the connect succeeds, is refused or is cancelled; on uvloop
(the daemon's loop) and on asyncio's own."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from probe.config import PathSpec
from probe.measure.conn import Conn
from probe.measure.sockets import bound_socket

ADDRESS = "127.0.83.1"  # this file's own loopback address
BIND = PathSpec(name="tunnel", kind="bind", address=ADDRESS)
LOOPS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {"uvloop": uvloop.run, "asyncio": asyncio.run}


@contextlib.contextmanager
def pong_server() -> Iterator[int]:
    """Answers each connection's first line with b"pong\\n", then closes it."""
    listener = socket.create_server((ADDRESS, 0))
    listener.settimeout(10)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                peer, _ = listener.accept()
                with peer:
                    peer.recv(100)
                    peer.sendall(b"pong\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(timeout=15)


def _watched(fd: int) -> tuple[bool, bool] | None:
    """Whether the running loop had a reader, a writer on `fd` (taking them off); None on
    uvloop, whose remove_reader and remove_writer do not say."""
    loop = asyncio.get_running_loop()
    if isinstance(loop, uvloop.Loop):
        loop.remove_reader(fd), loop.remove_writer(fd)
        return None
    return loop.remove_reader(fd), loop.remove_writer(fd)


def test_a_bound_socket_is_non_blocking_from_the_start() -> None:
    sock = bound_socket(socket.AF_INET, BIND)
    with sock:
        assert not sock.getblocking()
        assert sock.gettimeout() == 0.0
        assert sock.getsockname()[0] == ADDRESS
        assert sock.type == socket.SOCK_STREAM


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_answers_and_leaves_nothing_on_the_loop(loop: str) -> None:
    async def scenario(port: int) -> tuple[bytes, float, float, tuple[bool, bool] | None]:
        sock = bound_socket(socket.AF_INET, BIND)
        fd = sock.fileno()
        conn, connect_ms = await Conn.connect(sock, (ADDRESS, port))
        await conn.send(b"ping\n")
        answer = await conn.readuntil(b"\n", 100)
        conn.close()
        return answer, connect_ms, conn.answer_ms(), _watched(fd)

    with pong_server() as port:
        answer, connect_ms, answer_ms, watched = LOOPS[loop](scenario(port))
    assert answer == b"pong\n"
    assert 0 <= connect_ms < 1000
    assert 0 <= answer_ms < 1000
    assert watched == ((False, False) if loop == "asyncio" else None)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_refused_connect_leaves_nothing_on_the_loop(loop: str) -> None:
    with socket.socket() as spare:  # a port of this address nobody listens on
        spare.bind((ADDRESS, 0))
        port = spare.getsockname()[1]

    async def scenario() -> tuple[type[BaseException], tuple[bool, bool] | None]:
        sock = bound_socket(socket.AF_INET, BIND)
        fd = sock.fileno()
        try:
            await Conn.connect(sock, (ADDRESS, port))
        except OSError as exc:
            return type(exc), _watched(fd)
        finally:
            sock.close()
        raise AssertionError("the connect succeeded")

    error, watched = LOOPS[loop](scenario())
    assert error is ConnectionRefusedError
    assert watched == ((False, False) if loop == "asyncio" else None)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connect_cancelled_while_pending_leaves_nothing_on_the_loop(loop: str) -> None:
    """A listener that never accepts, its queue full: the kernel drops the next SYN, so the
    connect stays pending until the timeout cancels it."""
    listener = socket.create_server((ADDRESS, 0), backlog=0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex((ADDRESS, port))
        fillers.append(filler)

    async def scenario() -> tuple[bool, tuple[bool, bool] | None]:
        await asyncio.sleep(0.2)  # the fillers' handshakes fill the accept queue
        sock = bound_socket(socket.AF_INET, BIND)
        fd = sock.fileno()
        try:
            async with asyncio.timeout(0.5):
                await Conn.connect(sock, (ADDRESS, port))
        except TimeoutError:
            return True, _watched(fd)
        finally:
            sock.close()
        return False, _watched(fd)

    try:
        timed_out, watched = LOOPS[loop](scenario())
    finally:
        listener.close()
        for filler in fillers:
            filler.close()
    assert timed_out
    assert watched == ((False, False) if loop == "asyncio" else None)
