"""A TCP connection the probe drives itself, timed by the kernel.

A probe's timings must not depend on how busy its own event loop is. With hundreds of
probes in flight a callback runs milliseconds after its data arrived, and a time taken
there measures the loop, not the network. So every phase here is measured from the moment
the probe handed bytes to the kernel (taken right before the send, which runs at once) to
the moment the kernel received the answer:
- the TCP handshake from `TCP_INFO`: the kernel's round-trip time of the SYN (unless the SYN
  was retransmitted; then the time seen from here, which holds the retransmission wait);
- every answer from `SO_TIMESTAMPNS`: the arrival time of the newest segment in the receive
  queue, read with the bytes (`recvmsg`); a phase of several round trips (TLS 1.2, SOCKS
  with authentication) is the sum of its round trips, without the probe's own time between.
TLS runs over memory BIOs (`ssl.SSLObject`), so its records are read with their timestamps
too. The socket is non-blocking and waited on with the loop's `add_reader`/`add_writer`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
import struct
import time

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python does not export it
TIMESPEC = struct.Struct("qq")
ANCILLARY_BYTES = socket.CMSG_SPACE(TIMESPEC.size)
TCP_INFO_BYTES = 104
TCPI_RTT_OFFSET = 68  # struct tcp_info: tcpi_rtt (microseconds)
TCPI_TOTAL_RETRANS_OFFSET = 100
READ_BYTES = 65536


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _ready(fd: int, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
    add(fd, _wake, future)
    try:
        await future
    finally:
        remove(fd)


def _handshake_ms(sock: socket.socket, seen_ms: float) -> float:
    """The kernel's round-trip time of the SYN, or `seen_ms` when the SYN had to be resent."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES)
    (rtt_us,) = struct.unpack_from("I", info, TCPI_RTT_OFFSET)
    (retransmitted,) = struct.unpack_from("I", info, TCPI_TOTAL_RETRANS_OFFSET)
    return seen_ms if retransmitted or not rtt_us else rtt_us / 1000


class Conn:
    """A connected non-blocking TCP socket, optionally upgraded to TLS, with kernel times.

    `sent_ns` is when the last `send` started, `received_ns` when the kernel received the
    bytes the last read returned (both CLOCK_REALTIME, ns): `answer_ms()` is their distance.
    """

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer  # the address connected to
        self.sent_ns = 0
        self.received_ns = 0
        self._awaiting = False  # a send went out: its answer cannot be there yet, wait first
        self._buffer = bytearray()  # bytes read ahead by readexactly/readuntil
        self._tls: ssl.SSLObject | None = None
        # The socket's reader stays on the loop from one read to the next (a reader added and
        # removed per wait is three system calls each time): `_reading` is the read waiting.
        self._reader_loop: asyncio.AbstractEventLoop | None = None
        self._reading: asyncio.Future[None] | None = None

    @classmethod
    async def connect(cls, sock: socket.socket, address: tuple[str, int]) -> tuple[Conn, float]:
        """Connect `sock` (non-blocking, unconnected); the connection and its handshake time in ms."""
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        started = time.perf_counter()
        conn = cls(sock, address[0])
        code = sock.connect_ex(address)
        if code == errno.EINPROGRESS:
            code = await conn._connected()
        if code:
            raise OSError(code, os.strerror(code))
        try:
            return conn, _handshake_ms(sock, (time.perf_counter() - started) * 1000)
        except BaseException:
            conn.close()
            raise

    async def _connected(self) -> int:
        """Wait until the connect completes; its error code (0: connected). Once connected, the
        socket's reader goes on the loop before its writer comes off, so both share one poll
        handle: on uvloop a handle closed and a new one opened are seven system calls (FIONBIO,
        epoll ADD and four DELs), a handle kept and changed two. A failed connect adds no
        reader (uvloop has closed the handle that saw the error; removing the writer forgets it)."""
        fd = self.sock.fileno()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.add_writer(fd, _wake, future)
        try:
            await future
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not code:
                self._reader_loop = loop
                loop.add_reader(fd, self._readable)
        finally:
            loop.remove_writer(fd)
        return code

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self._tls

    def answer_ms(self) -> float:
        """From the start of the last send to the kernel's arrival time of the last read."""
        return (self.received_ns - self.sent_ns) / 1e6

    def close(self) -> None:
        loop, self._reader_loop = self._reader_loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _readable(self) -> None:
        waiting, self._reading = self._reading, None
        if waiting is None:  # no read waits: off the loop until one does (the socket stays readable)
            loop, self._reader_loop = self._reader_loop, None
            if loop is not None:
                loop.remove_reader(self.sock.fileno())
        elif not waiting.done():
            waiting.set_result(None)

    async def _wait_readable(self) -> None:
        loop = self._reader_loop
        if loop is None:
            loop = self._reader_loop = asyncio.get_running_loop()
            loop.add_reader(self.sock.fileno(), self._readable)
        waiting = self._reading = loop.create_future()
        try:
            await waiting
        finally:
            if self._reading is waiting:
                self._reading = None

    async def send(self, data: bytes) -> None:
        self.sent_ns = time.time_ns()
        self._awaiting = True
        if self._tls is not None:
            self._tls.write(data)
            data = self._outgoing.read()
        await self._send_raw(data)

    async def recv(self) -> bytes:
        """The next bytes (plaintext under TLS); b"" at the end of the stream."""
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        return await self._read()

    async def readexactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._buffer += await self._more()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def readuntil(self, separator: bytes, limit: int) -> bytes:
        """Up to and including `separator`; ValueError beyond `limit` bytes."""
        while (end := self._buffer.find(separator, 0, limit)) < 0:
            if len(self._buffer) >= limit:
                raise ValueError(f"no {separator!r} in the first {limit} bytes")
            self._buffer += await self._more()
        return await self.readexactly(end + len(separator))

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> float:
        """Handshake over this connection; the handshake's time in ms on the network: for
        each flight the client sent, until the kernel received the server's answer to it
        (TLS 1.2 takes two; the client's own work in between is not the network's)."""
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        # As bytes, an ASCII name skips the ssl module's IDNA codec (pure Python) on every handshake.
        hostname: str | bytes | None = server_hostname or None
        if server_hostname and server_hostname.isascii():
            hostname = server_hostname.encode("ascii")
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        network_ns = flight_sent_ns = answered_ns = 0
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass  # waiting outside the handler keeps this out of a timeout's exception chain
            if flight := self._outgoing.read():
                network_ns += answered_ns - flight_sent_ns
                flight_sent_ns = answered_ns = time.time_ns()
                await self._send_raw(flight)
                self._awaiting = True
            raw = await self._recv_raw()
            if not raw:
                raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "the server closed the connection during the handshake")
            answered_ns = self.received_ns
            self._incoming.write(raw)
        await self._send_raw(self._outgoing.read())
        return (network_ns + answered_ns - flight_sent_ns) / 1e6

    async def _more(self) -> bytes:
        data = await self._read()
        if not data:
            raise asyncio.IncompleteReadError(bytes(self._buffer), None)
        return data

    async def _read(self) -> bytes:
        if self._tls is None:
            return await self._recv_raw()
        while True:
            if self._incoming.pending or self._tls.pending():  # else the read would only ask for more
                try:
                    return self._tls.read(READ_BYTES)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:  # close_notify
                    return b""
            raw = await self._recv_raw()
            if not raw:
                return b""  # many servers close without close_notify; the HTTP framing decides
            self._incoming.write(raw)

    async def _send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
                continue
            except BlockingIOError:
                pass
            await _ready(self.sock.fileno(), writable=True)

    async def _recv_raw(self) -> bytes:
        if self._awaiting:
            self._awaiting = False
            await self._wait_readable()
        else:  # a peer that always has more waiting must not keep the loop (and timeouts) from running
            await asyncio.sleep(0)
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(READ_BYTES, ANCILLARY_BYTES)
                break
            except BlockingIOError:
                pass  # waiting outside the handler keeps this out of a timeout's exception chain
            await self._wait_readable()
        self.received_ns = time.time_ns()  # unless the kernel says when, below
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = TIMESPEC.unpack(payload)
                self.received_ns = seconds * 1_000_000_000 + nanoseconds
        return data
