"""DNS queries the probe sends itself, timed by the kernel like every other phase.

A stub resolver (glibc's, c-ares) hides what a measurement needs: c-ares keeps answers in a
cache and a thread per channel, and every stub takes the first answer and drops the rest.
Here the queries for a name (A and AAAA, as glibc sends them) go out together on one
non-blocking UDP socket, bound as the path's other sockets are, and their answers are read with
the kernel's arrival time (`SO_TIMESTAMPNS`), as probe/measure/conn.py reads a TCP connection:
the resolve phase runs from the send to the kernel's arrival of the answer, however late the
event loop gets to it. An answer with the TC bit is asked again over TCP. Nothing is cached;
dnspython writes and reads the messages.

A name is resolved on every probe, so a lookup does little besides: dnspython renders one
query per name (the others differ only in their id and question type, bytes set in a copy of
it) and reads each answer once (most of a lookup's CPU); the socket has one reader for its
whole life, which drains the datagrams as they come, rather than one wait per answer.

After the first answer, the socket is read a while longer (`linger_s`): an injector on the
path answers before the real server, so a second, different answer to one query is the trace
of a forgery. The linger is a wait with one deadline; lookups for a connection do not linger.

Retries follow glibc's res_send: `attempts` rounds over at most three servers, server i
waited for `timeout << i` seconds, divided by the number of servers when i > 0 (at least 1);
an answer of SERVFAIL, NOTIMP or REFUSED moves on to the next server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from probe.config import PathSpec
from probe.measure.conn import ANCILLARY_BYTES, READ_BYTES, SO_TIMESTAMPNS, TIMESPEC, Conn
from probe.measure.sockets import bound_socket

RESOLV_CONF = "/etc/resolv.conf"
DNS_PORT = 53
EDNS_PAYLOAD = 1232  # the 2020 DNS flag day's size: no fragmented answers
RETRY_RCODES = frozenset({dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED})
# glibc's defaults and bounds (resolv.h): RES_TIMEOUT, RES_DFLRETRY, ndots 1; RES_MAXRETRANS,
# RES_MAXRETRY, RES_MAXNDOTS; MAXNS servers.
TIMEOUT_S, ATTEMPTS, NDOTS = 5, 2, 1
MAX_TIMEOUT_S, MAX_ATTEMPTS, MAX_NDOTS, MAX_SERVERS = 30, 5, 15, 3
HEADER_BYTES = 12  # a message's fixed header; the question's name follows it
QTYPE = struct.Struct("!H")  # the id (bytes 0-1) and the question's type (after its name)
DRAIN_DATAGRAMS = 64  # read at once when the socket is readable; a flood must not hold the loop


@dataclass(frozen=True, slots=True)
class Server:
    host: str
    port: int = DNS_PORT

    @classmethod
    def parse(cls, text: str) -> Server:
        """ "ip", "ip:port", "[ipv6]" or "[ipv6]:port" (checked by the config already)."""
        if text.startswith("["):
            host, _, port = text[1:].partition("]")
            return cls(host, int(port[1:]) if port else DNS_PORT)
        if text.count(":") == 1:
            host, port = text.split(":")
            return cls(host, int(port))
        return cls(text)

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DNS_PORT else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Options:
    """How long and how often to ask: resolv.conf's `options timeout:N attempts:N ndots:N`."""

    timeout_s: int = TIMEOUT_S
    attempts: int = ATTEMPTS
    ndots: int = NDOTS

    def wait_s(self, index: int, servers: int) -> int:
        """glibc's wait for server `index` of `servers`, the same in every attempt."""
        seconds = self.timeout_s << index
        if index:
            seconds //= servers
        return max(seconds, 1)


@dataclass(frozen=True, slots=True)
class ResolvConf:
    servers: tuple[Server, ...]
    search: tuple[str, ...]
    options: Options


def parse_resolv_conf(text: str) -> ResolvConf:
    """nameserver, domain, search and options timeout/attempts/ndots, read as glibc's res_init
    reads them: the last domain or search line wins, at most three servers (127.0.0.1 when
    none), numbers capped at glibc's bounds. attempts:0 asks once rather than never."""
    servers: list[Server] = []
    search: list[str] | None = None
    options = {"timeout": TIMEOUT_S, "attempts": ATTEMPTS, "ndots": NDOTS}
    bounds = {"timeout": MAX_TIMEOUT_S, "attempts": MAX_ATTEMPTS, "ndots": MAX_NDOTS}
    for line in text.splitlines():
        words = line.split()
        if not words or words[0][0] in "#;":
            continue
        keyword, values = words[0], words[1:]
        if keyword == "nameserver" and values and len(servers) < MAX_SERVERS:
            try:
                ipaddress.ip_address(values[0].split("%")[0])
            except ValueError:
                continue
            servers.append(Server(values[0]))
        elif keyword == "domain" and values:
            search = values[:1]
        elif keyword == "search" and values:
            search = values
        elif keyword == "options":
            for option in values:
                name, _, number = option.partition(":")
                if name in options:
                    options[name] = min(int(number) if number.isdigit() else 0, bounds[name])
    if search is None:  # no domain or search line: the domain of the host's own name
        hostname = socket.gethostname()
        search = [hostname.split(".", 1)[1]] if "." in hostname.strip(".") else []
    return ResolvConf(
        servers=tuple(servers) or (Server("127.0.0.1"),),
        search=tuple(domain for domain in search if domain.strip(".")),
        options=Options(timeout_s=options["timeout"], attempts=max(options["attempts"], 1), ndots=options["ndots"]),
    )


_read: dict[str, tuple[tuple[int, int, int], ResolvConf]] = {}


def read_resolv_conf(path: str = RESOLV_CONF) -> ResolvConf:
    """The file as it is now: read again whenever it changed, as glibc does (its parse is kept
    only while the file's inode, size and mtime stay the same; answers are never kept)."""
    try:
        stat = os.stat(path)
    except OSError:
        return parse_resolv_conf("")
    key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    known = _read.get(path)
    if known and known[0] == key:
        return known[1]
    try:
        conf = parse_resolv_conf(Path(path).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return parse_resolv_conf("")
    _read[path] = (key, conf)
    return conf


@dataclass(frozen=True, slots=True)
class Reply:
    message: dns.message.Message
    received_ns: int  # the kernel's arrival time (CLOCK_REALTIME)
    rcode: dns.rcode.Rcode

    @classmethod
    def of(cls, message: dns.message.Message, received_ns: int) -> Reply:
        return cls(message, received_ns, message.rcode())

    @property
    def truncated(self) -> bool:
        return bool(self.message.flags & dns.flags.TC)

    def addresses(self, rdtype: dns.rdatatype.RdataType) -> list[str]:
        return [rdata.address for rrset in self.message.answer if rrset.rdtype == rdtype for rdata in rrset]


@dataclass(slots=True)
class Exchange:
    """One query: the answer it got, the answers that came after it, and its network time."""

    name: dns.name.Name
    rdtype: dns.rdatatype.RdataType
    started_ns: int = 0  # the first send
    network_ms: float = 0.0  # first send -> the answer's arrival; a TCP retry adds its handshake and round trip
    server: Server | None = None
    reply: Reply | None = None  # None: no server answered
    later: list[Reply] = field(default_factory=list)
    error: Exception | None = None  # why the last server tried gave no answer

    @property
    def addresses(self) -> list[str]:
        return self.reply.addresses(self.rdtype) if self.reply else []

    @property
    def conflicting(self) -> bool:
        """A later answer says something else: another rcode, or (whole) other addresses."""
        if self.reply is None:
            return False
        first = set(self.addresses)
        return any(
            r.rcode != self.reply.rcode or (not r.truncated and set(r.addresses(self.rdtype)) != first)
            for r in self.later
        )

    def describe(self) -> str:
        """Every answer with its time after the first send, for the measurement's detail."""
        replies = [self.reply, *self.later] if self.reply else []
        answers = "; ".join(
            f"{dns.rcode.to_text(r.rcode)} [{', '.join(r.addresses(self.rdtype))}] at "
            f"{(r.received_ns - self.started_ns) / 1e6:.1f} ms"
            for r in replies
        )
        return f"{self.name} {dns.rdatatype.to_text(self.rdtype)} from {self.server}: {answers}"


def _socket(family: int, kind: int, path: PathSpec | None) -> socket.socket:
    if path is None:
        sock = socket.socket(family, kind)
        sock.setblocking(False)
        return sock
    return bound_socket(family, path, kind)


class _Datagrams:
    """A connected UDP socket whose datagrams are read as they arrive, each with the kernel's
    arrival time (CLOCK_REALTIME ns): one reader for the socket's life drains them into a
    queue, so an answer costs one `recvmsg`, not a wait set up and torn down for it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._arrived: deque[tuple[bytes, int]] = deque()
        self._error: OSError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    def open(cls, server: Server, path: PathSpec | None) -> _Datagrams:
        sock = _socket(server.family, socket.SOCK_DGRAM, path)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.connect((server.host, server.port))
            return cls(sock)
        except BaseException:
            sock.close()
            raise

    def _readable(self) -> None:
        for _ in range(DRAIN_DATAGRAMS):
            try:
                data, ancillary, _, _ = self.sock.recvmsg(READ_BYTES, ANCILLARY_BYTES)
            except BlockingIOError:
                break
            except OSError as exc:  # ECONNREFUSED: the ICMP port unreachable of a query sent
                self._error = exc
                break
            received_ns = time.time_ns()  # unless the kernel says when, below
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = TIMESPEC.unpack(payload)
                    received_ns = seconds * 1_000_000_000 + nanoseconds
            self._arrived.append((data, received_ns))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def send(self, data: bytes) -> int:
        """Send one datagram; the time its send started (ns)."""
        sent_ns = time.time_ns()
        try:
            self.sock.send(data)
        except BlockingIOError:  # the socket's buffer is full: wait for room
            await self._loop.sock_sendall(self.sock, data)
        return sent_ns

    async def receive(self) -> tuple[bytes, int]:
        """The next datagram and its arrival time; the socket's error, in its turn."""
        while not self._arrived:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._arrived.popleft()

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


def _parse(data: bytes) -> dns.message.Message | None:
    try:
        return dns.message.from_wire(data, raise_on_truncation=True)
    except dns.message.Truncated as truncated:
        partial: dns.message.Message = truncated.message()  # type: ignore[no-untyped-call]  # unannotated in dnspython
        return partial
    except dns.exception.DNSException:
        return None  # not a DNS message: ignored, as every stub does


@dataclass(slots=True)
class _Query:
    message: dns.message.Message  # its id, flags and question: what an answer must match
    wire: bytes
    result: Exchange
    first_ns: int = 0  # the kernel's arrival time of the first answer over UDP


def _queries(name: dns.name.Name, rdtypes: Sequence[dns.rdatatype.RdataType]) -> list[_Query]:
    """One query per type, each with its own random id, recursion desired and EDNS0.
    dnspython renders the first; the others differ from it only in the id and the question's
    type, so they are its wire with those two fields set."""
    first = dns.message.make_query(name, rdtypes[0], use_edns=0, payload=EDNS_PAYLOAD)
    wire = first.to_wire()
    type_at = HEADER_BYTES + len(name.to_digestable())  # the name, uncompressed
    queries = [_Query(first, wire, Exchange(name, rdtypes[0]))]
    for rdtype in rdtypes[1:]:
        message = dns.message.QueryMessage()  # a random id
        message.flags = first.flags
        message.question = [dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)]
        other = QTYPE.pack(message.id) + wire[2:type_at] + QTYPE.pack(rdtype) + wire[type_at + 2 :]
        queries.append(_Query(message, other, Exchange(name, rdtype)))
    return queries


async def _next_reply(link: _Datagrams, queries: Sequence[_Query]) -> tuple[_Query, Reply]:
    """The next datagram that answers one of `queries` (same id and question), and which."""
    while True:
        data, received_ns = await link.receive()
        message = _parse(data)
        if message is None:
            continue
        for query in queries:
            if query.message.id == message.id and query.message.is_response(message):
                return query, Reply.of(message, received_ns)


async def _over_tcp(query: _Query, server: Server, path: PathSpec | None) -> tuple[Reply, float]:
    """The query again over TCP; the answer and the network time (handshake + round trip)."""
    sock = _socket(server.family, socket.SOCK_STREAM, path)
    try:
        conn, handshake_ms = await Conn.connect(sock, (server.host, server.port))
    except BaseException:
        sock.close()
        raise
    try:
        await conn.send(struct.pack("!H", len(query.wire)) + query.wire)
        (size,) = struct.unpack("!H", await conn.readexactly(2))
        message = _parse(await conn.readexactly(size))
        if message is None or not query.message.is_response(message):
            raise EOFError(f"{server} answered the query over TCP with something else")
        return Reply.of(message, conn.received_ns), handshake_ms + conn.answer_ms()
    finally:
        conn.close()


def _settled(query: _Query) -> bool:
    """Answered, by an rcode that does not send it on to the next server."""
    return query.result.reply is not None and query.result.reply.rcode not in RETRY_RCODES


async def _ask(
    link: _Datagrams, server: Server, queries: list[_Query], waiting: list[_Query], path: PathSpec | None
) -> None:
    """Send every waiting query to `server` and read until each has an answer (a second answer
    to a query already answered is kept: see _linger)."""
    for query in waiting:
        sent_ns = await link.send(query.wire)
        query.result.started_ns = query.result.started_ns or sent_ns
    unanswered = list(waiting)
    while unanswered:
        query, reply = await _next_reply(link, queries)
        if query not in unanswered:
            query.result.later.append(reply)
            continue
        unanswered.remove(query)
        query.result.later.clear()
        query.first_ns, tcp_ms = reply.received_ns, 0.0
        if reply.truncated:
            reply, tcp_ms = await _over_tcp(query, server, path)
        result = query.result
        result.server, result.reply, result.error = server, reply, None
        result.network_ms = (query.first_ns - result.started_ns) / 1e6 + tcp_ms


async def _linger(link: _Datagrams, queries: list[_Query], linger_ns: int) -> None:
    """Read on until `linger_ns` after the last first answer; exchange() keeps what came within
    `linger_ns` of each query's own first answer."""
    deadline_ns = max(q.first_ns for q in queries) + linger_ns
    try:
        async with asyncio.timeout(max(deadline_ns - time.time_ns(), 0) / 1e9):
            while True:
                query, reply = await _next_reply(link, queries)
                query.result.later.append(reply)
    except (TimeoutError, OSError):
        pass


async def exchange(
    name: dns.name.Name,
    rdtypes: Sequence[dns.rdatatype.RdataType],
    servers: Sequence[Server],
    options: Options,
    path: PathSpec | None = None,
    linger_s: float = 0,
) -> tuple[Exchange, ...]:
    """Ask `servers` for `name`, one query per type, all on one socket per server, as glibc
    asks for A and AAAA. Never raises for a server that does not answer (each Exchange says
    why), only for a socket the path cannot bind."""
    queries = _queries(name, rdtypes)
    waiting = queries
    links: dict[Server, _Datagrams] = {}
    try:
        for _attempt in range(options.attempts):
            for index, server in enumerate(servers):
                if not waiting:
                    break
                try:
                    if server not in links:  # one socket per server, kept over the attempts, as glibc does
                        links[server] = _Datagrams.open(server, path)
                    async with asyncio.timeout(options.wait_s(index, len(servers))):
                        await _ask(links[server], server, queries, waiting, path)
                except (OSError, EOFError) as exc:  # TimeoutError included; ECONNREFUSED: ICMP port unreachable
                    for query in waiting:
                        query.result.error = exc  # an answer from an earlier server still counts first
                waiting = [query for query in queries if not _settled(query)]
        for query in queries:
            if query.result.reply is None and query.result.started_ns:
                query.result.network_ms = (time.time_ns() - query.result.started_ns) / 1e6
        linger_ns = int(linger_s * 1e9)
        answered = {
            q.result.server: [p for p in queries if p.result.server == q.result.server and p.first_ns]
            for q in queries
            if q.first_ns
        }
        if linger_ns and answered:
            await asyncio.gather(
                *(_linger(links[server], asked, linger_ns) for server, asked in answered.items() if server is not None)
            )
    finally:
        for link in links.values():
            link.close()
    for query in queries:
        query.result.later = [r for r in query.result.later if r.received_ns <= query.first_ns + linger_ns]
    return tuple(q.result for q in queries)
