"""DNS queries the probe sends itself, timed by the kernel like every other phase.

A stub resolver (glibc's, c-ares) hides what a measurement needs: c-ares keeps answers in a
cache and a thread per channel, and every stub takes the first answer and drops the rest.
Here the queries for a name (A and AAAA, as glibc sends them) go out together on one
non-blocking UDP socket, bound as the path's other sockets are, and their answers are read with
the kernel's arrival time (`SO_TIMESTAMPNS`), as probe/measure/conn.py reads a TCP connection:
the resolve phase runs from the send to the kernel's arrival of the answer, however late the
event loop gets to it. An answer with the TC bit is asked again over TCP. Nothing is cached;
dnspython writes and reads the messages (probe/measure/answers.py).

A name is resolved on every probe, so a lookup does little besides: the queries are one
rendering per name and type with its id set, the answers are read without building
dnspython Messages (answers.py), and the socket has one callback for its whole life, which
reads each datagram as it comes and hands it to its lookup, so a lookup waits once, for all
of its answers.

After the first answer, the socket is read a while longer (`linger_s`): an injector on the
path answers before the real server, so a second, different answer to one query is the trace
of a forgery. The linger is one timer, the callback keeps what comes meanwhile; lookups for a
connection do not linger.

Retries follow glibc's res_send: `attempts` rounds over at most three servers, server i
waited for `timeout << i` seconds, divided by the number of servers when i > 0 (at least 1);
an answer of SERVFAIL, NOTIMP or REFUSED moves on to the next server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.name
import dns.rcode
import dns.rdatatype

from probe.config import PathSpec
from probe.measure.answers import U16, Query, Reply, make_queries, read
from probe.measure.conn import ANCILLARY_BYTES, READ_BYTES, SO_TIMESTAMPNS, TIMESPEC, Conn
from probe.measure.sockets import bound_socket

RESOLV_CONF = "/etc/resolv.conf"
DNS_PORT = 53
RETRY_RCODES = frozenset({dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED})
# glibc's defaults and bounds (resolv.h): RES_TIMEOUT, RES_DFLRETRY, ndots 1; RES_MAXRETRANS,
# RES_MAXRETRY, RES_MAXNDOTS; MAXNS servers.
TIMEOUT_S, ATTEMPTS, NDOTS = 5, 2, 1
MAX_TIMEOUT_S, MAX_ATTEMPTS, MAX_NDOTS, MAX_SERVERS = 30, 5, 15, 3
DRAIN_DATAGRAMS = 64  # read at once when the socket is readable; a flood must not hold the loop
MAX_IDS = 4096  # query ids sent on one shared socket before it takes no new lookups (of 65,536)
TIMESTAMP_CMSG = (socket.SOL_SOCKET, SO_TIMESTAMPNS)  # an arrival time's control message: level, type
MAX_SHARERS = 16  # lookups at once on one shared socket: 32 answers of up to 1232 bytes in its buffer


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


@dataclass(slots=True, eq=False)  # one object per query, made on every lookup
class Exchange(Query):
    """One query (as sent: answers.py's Query): the answer it got, the answers that came after
    it, and its network time; while its lookup runs, also how far the lookup got with it."""

    started_ns: int = 0  # the first send
    network_ms: float = 0.0  # first send -> the answer's arrival; a TCP retry adds its handshake and round trip
    server: Server | None = None
    reply: Reply | None = None  # None: no server answered
    later: list[Reply] = field(default_factory=list)
    error: Exception | None = None  # why the last server tried gave no answer
    pending: bool = False  # sent to the server asked now and not yet answered by it
    first_ns: int = 0  # the kernel's arrival time of the first answer over UDP
    answered_by: _Link | None = None  # the socket of that first answer: its later answers are kept
    truncated: Reply | None = None  # a first answer with the TC bit, to ask again over TCP

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.reply.addresses if self.reply else ()

    @property
    def conflicting(self) -> bool:
        """A later answer says something else: another rcode, or (whole) other addresses."""
        if self.reply is None:
            return False
        first = set(self.addresses)
        return any(r.rcode != self.reply.rcode or (not r.truncated and set(r.addresses) != first) for r in self.later)

    def describe(self) -> str:
        """Every answer with its time after the first send, for the measurement's detail."""
        replies = [self.reply, *self.later] if self.reply else []
        answers = "; ".join(
            f"{dns.rcode.to_text(r.rcode)} [{', '.join(r.addresses)}] at "
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


class _Link:
    """A connected UDP socket to one server, its datagrams read as they arrive, each with the
    kernel's arrival time (CLOCK_REALTIME ns), by one callback for the socket's life that hands
    each answer to the lookup whose query has its id: no wait is set up and torn down per answer.

    The lookups of one event loop asking one server from one source (the path's bound address
    and interface) share a socket while any of them runs, at most MAX_SHARERS at once (their
    answers wait in its receive buffer together: a default one holds some 200 KB), and it is
    closed when the last one ends: socket, connect, the loop's reader and close once for them
    all, not per lookup. An answer reaches only the lookup that sent a query with its id (and
    is read against that query's question); an id is sent at most once on a socket (a lookup
    that draws an id used before on it asks on another), so an answer that comes late, after
    its lookup ended, is no one's. After MAX_IDS ids the socket takes no new lookups (it closes
    when its last one ends), so ids stay easy to draw and a socket's port is not used for long."""

    def __init__(self, sock: socket.socket, server: Server, key: _Key) -> None:
        self.sock = sock
        self.server = server
        self._key: _Key | None = key  # in _LINKS' pool under it while it takes new lookups
        self._asked: dict[int, _Lookup] = {}  # query id -> the running lookup that sent it here
        self._used: set[int] = set()  # every id sent here
        self._users = 1
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    def open(cls, server: Server, path: PathSpec | None, key: _Key) -> _Link:
        sock = _socket(server.family, socket.SOCK_DGRAM, path)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.connect((server.host, server.port))
            return cls(sock, server, key)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def share(cls, server: Server, path: PathSpec | None, lookup: _Lookup) -> _Link:
        """A socket the lookups of this loop share to `server` from `path`'s source, with
        `lookup`'s ids taken on it: one with room for another lookup and none of its ids used,
        or a new one."""
        key = (
            asyncio.get_running_loop(),
            server.host,
            server.port,
            *((path.address, path.interface) if path else (None, None)),
        )
        pool = _LINKS.get(key)
        if pool is None:
            pool = _LINKS[key] = []
        for link in reversed(pool):
            if link._users < MAX_SHARERS and link._take(lookup):
                link._users += 1
                return link
        link = cls.open(server, path, key)
        pool.append(link)
        link._take(lookup)
        return link

    def _take(self, lookup: _Lookup) -> bool:
        used = self._used
        ids = lookup.ids
        if not used.isdisjoint(ids):
            return False
        used.update(ids)
        asked = self._asked
        for query_id in ids:
            asked[query_id] = lookup
        if len(used) >= MAX_IDS:  # no new lookups: closed after its last
            self._retire()
        return True

    def _retire(self) -> None:
        """Out of the pool: no new lookups."""
        if self._key is not None:
            pool = _LINKS.get(self._key, [])
            if self in pool:
                pool.remove(self)
            if not pool:
                _LINKS.pop(self._key, None)
            self._key = None

    def release(self, lookup: _Lookup) -> None:
        """`lookup` ended: its answers are no one's now; the last lookup closes the socket."""
        asked = self._asked
        for query_id in lookup.ids:
            if asked.get(query_id) is lookup:
                del asked[query_id]
        self._users -= 1
        if not self._users:
            self.close()

    def _readable(self) -> None:
        asked = self._asked
        recvmsg = self.sock.recvmsg
        for _ in range(DRAIN_DATAGRAMS):
            try:
                data, ancillary, _, _ = recvmsg(READ_BYTES, ANCILLARY_BYTES)
            except BlockingIOError:
                break
            except OSError as exc:  # ECONNREFUSED: the ICMP port unreachable of a query sent
                for failing in set(asked.values()):
                    failing.failed(self, exc)
                break
            lookup = asked.get(U16.unpack_from(data)[0]) if len(data) >= 2 else None
            if lookup is None:
                continue  # no query of a running lookup has its id: ignored, as every stub does
            if ancillary and ancillary[0][:2] == TIMESTAMP_CMSG:  # the only one asked for
                seconds, nanoseconds = TIMESPEC.unpack(ancillary[0][2])
                received_ns = seconds * 1_000_000_000 + nanoseconds
            else:
                received_ns = time.time_ns()  # the kernel did not say when
            lookup.arrived(self, data, received_ns)

    def close(self) -> None:
        self._retire()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


_Key = tuple[asyncio.AbstractEventLoop, str, int, str | None, str | None]  # loop, server, source
_LINKS: dict[_Key, list[_Link]] = {}  # the shared sockets taking new lookups, while a lookup uses them


class _Lookup:
    """The queries for one name, the server asked now and the answers as they arrive: the
    first answer of each query from that server, then every later answer from the server that
    gave a query its first one (see exchange's linger)."""

    def __init__(self, name: dns.name.Name, rdtypes: Sequence[dns.rdatatype.RdataType]) -> None:
        queries = self.queries = make_queries(name, rdtypes, Exchange)
        self.ids = [query.id for query in queries]
        self.asking: _Link | None = None
        self._waiting = 0
        self._done: asyncio.Future[None] | None = None
        self._error: Exception | None = None  # ends the wait: raised by ask()

    def arrived(self, link: _Link, data: bytes, received_ns: int) -> None:
        try:
            found = read(data, received_ns, self.queries)
        except Exception as exc:  # not a message dnspython refuses (those are None): the lookup fails with it
            self.failed(link, exc)
            return
        if found is None:
            return
        query, reply = self.queries[found[0]], found[1]
        if query.pending and link is self.asking:
            query.pending = False
            query.first_ns, query.answered_by = received_ns, link
            query.later.clear()
            if reply.truncated:
                query.truncated = reply
            else:  # settled: as _settle, inline (on every answer)
                query.server, query.reply, query.error = link.server, reply, None
                query.network_ms = (received_ns - query.started_ns) / 1e6
            self._waiting -= 1
            if not self._waiting and self._done is not None and not self._done.done():
                self._done.set_result(None)  # as _wake, inline
        elif query.answered_by is link:
            query.later.append(reply)

    def failed(self, link: _Link, error: Exception) -> None:
        if link is self.asking and self._waiting:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _expire(self) -> None:
        self._error = TimeoutError()
        self._wake()

    async def ask(self, link: _Link, waiting: list[Exchange], path: PathSpec | None, wait_s: float) -> None:
        """Send every waiting query to `link`'s server and wait up to `wait_s` until each has
        an answer from it; a truncated one is asked again over TCP within that time. Raises
        the socket's error, or TimeoutError."""
        loop = link.loop
        deadline = loop.time() + wait_s
        self.asking, self._waiting, self._error = link, len(waiting), None
        send = link.sock.send
        try:
            for query in waiting:
                query.pending, query.truncated = True, None  # its answer cannot come before its send
                sent_ns = time.time_ns()
                try:
                    send(query.wire)
                except BlockingIOError:  # the socket's buffer is full: wait for room
                    async with asyncio.timeout_at(deadline):
                        await loop.sock_sendall(link.sock, query.wire)
                if not query.started_ns:
                    query.started_ns = sent_ns
            if self._waiting:
                done = self._done = loop.create_future()
                # one timer, no task or context per wait; uvloop's call_at is a call_later with more steps
                timer = loop.call_later(deadline - loop.time(), self._expire)
                try:
                    await done
                finally:
                    timer.cancel()
            if self._error is not None:
                raise self._error
        finally:
            self.asking, self._done = None, None
            for query in waiting:
                query.pending = False
        for query in waiting:
            if query.truncated is not None:
                async with asyncio.timeout_at(deadline):
                    reply, tcp_ms = await _over_tcp(query, link.server, path)
                _settle(query, link.server, reply, tcp_ms)


def _settle(query: Exchange, server: Server, reply: Reply, tcp_ms: float) -> None:
    query.server, query.reply, query.error = server, reply, None
    query.network_ms = (query.first_ns - query.started_ns) / 1e6 + tcp_ms


async def _over_tcp(query: Exchange, server: Server, path: PathSpec | None) -> tuple[Reply, float]:
    """The query again over TCP; the answer and the network time (handshake + round trip)."""
    sock = _socket(server.family, socket.SOCK_STREAM, path)
    try:
        conn, handshake_ms = await Conn.connect(sock, (server.host, server.port))
    except BaseException:
        sock.close()
        raise
    try:
        await conn.send(U16.pack(len(query.wire)) + query.wire)
        (size,) = U16.unpack(await conn.readexactly(2))
        found = read(await conn.readexactly(size), conn.received_ns, [query])
        if found is None:
            raise EOFError(f"{server} answered the query over TCP with something else")
        return found[1], handshake_ms + conn.answer_ms()
    finally:
        conn.close()


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
    lookup = _Lookup(name, rdtypes)
    queries = waiting = lookup.queries
    links: dict[int, _Link] = {}  # by the server's index
    try:
        for _attempt in range(options.attempts):
            if not waiting:
                break
            for index, server in enumerate(servers):
                if not waiting:
                    break
                try:
                    link = links.get(index)
                    if link is None:  # one socket per server, kept over the attempts, as glibc does
                        link = links[index] = _Link.share(server, path, lookup)
                    await lookup.ask(link, waiting, path, options.wait_s(index, len(servers)))
                except (OSError, EOFError) as exc:  # TimeoutError included; ECONNREFUSED: ICMP port unreachable
                    for query in waiting:
                        query.error = exc  # an answer from an earlier server still counts first
                # not settled: no answer, or one whose rcode sends the query on to the next server
                waiting = [query for query in queries if query.reply is None or query.reply.rcode in RETRY_RCODES]
        last_ns = 0
        for query in queries:
            if query.reply is None and query.started_ns:
                query.network_ms = (time.time_ns() - query.started_ns) / 1e6
            if query.first_ns > last_ns:
                last_ns = query.first_ns
        linger_ns = int(linger_s * 1e9)
        if linger_ns and last_ns:  # the answering sockets' callbacks keep what comes meanwhile
            await asyncio.sleep(max(last_ns + linger_ns - time.time_ns(), 0) / 1e9)
    finally:
        for link in links.values():
            link.release(lookup)
    for query in queries:
        if query.later:
            query.later = [r for r in query.later if r.received_ns <= query.first_ns + linger_ns]
    return tuple(queries)
