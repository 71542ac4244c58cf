"""Names resolved by the probe itself: the queries of probe/measure/resolver.py, A and AAAA in parallel.

The system resolver is what an application on this machine would get: the hosts file first,
then /etc/resolv.conf's servers, search domains and options, applied as glibc applies them. A
path's own servers (`resolver = ["ip", "ip:port"]`) are asked for the name as written.

Connection probes take the first answers and go on, as applications do. `dns` targets ask
for the name as written, never read the hosts file, and wait `probe.dns_linger_s` after each
first answer: a second answer that says something else is `dns_answers_conflict`.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.name
import dns.rcode
import dns.rdatatype

from probe.config import PathSpec, ProbeSettings, Target
from probe.errors import ProbeFailure
from probe.measure.failures import DNS_ANSWERS_CONFLICT, dns_failure
from probe.measure.resolver import RESOLV_CONF, Exchange, Options, ResolvConf, Server, exchange, read_resolv_conf
from probe.measure.sockets import check_bind
from probe.model import BIND, RESOLVE, Trace

HOSTS = "/etc/hosts"
ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
MAX_ANSWERS = 32  # addresses recorded of one answer (a 64 KiB answer holds thousands)
MAX_RESOLVERS = 1024  # paths whose resolver is kept


@dataclass(frozen=True, slots=True)
class Resolver:
    """Where a path's names are resolved: its own servers, or the system's (resolv.conf)."""

    servers: tuple[str, ...] = ()
    path: PathSpec | None = None  # queries leave from its bound address or interface
    resolv_conf: str = RESOLV_CONF
    hosts: str = HOSTS

    @property
    def label(self) -> str:
        return ",".join(self.servers) if self.servers else "system"

    def settings(self) -> ResolvConf:
        """Servers (those the bound address can reach), search domains and options. A path's
        own servers are asked with glibc's default options and no search domains."""
        if self.servers:
            conf = _own(self.servers)
        else:
            conf = read_resolv_conf(self.resolv_conf)
        if self.path is None or not self.path.address:
            return conf
        address = self.path.address
        reachable = tuple(s for s in conf.servers if (":" in s.host) == (":" in address))
        if not reachable:
            servers = ", ".join(map(str, conf.servers))
            raise ProbeFailure("address_not_available", BIND, f"no resolver of {address}'s family in {servers}")
        return dataclasses.replace(conf, servers=reachable)


@functools.lru_cache(maxsize=256)  # a path's own servers, parsed once (settings are asked on every lookup)
def _own(servers: tuple[str, ...]) -> ResolvConf:
    return ResolvConf(servers=tuple(map(Server.parse, servers)), search=(), options=Options())


_resolvers: dict[int, tuple[PathSpec, Resolver]] = {}  # by the path object's id, the path kept alive with it


def resolver_for(path: PathSpec) -> Resolver:
    """The path's resolver: made once per path object (asked on every probe of a name), as a
    path's settings are frozen."""
    known = _resolvers.get(id(path))
    if known is not None and known[0] is path:
        return known[1]
    servers = () if path.resolver == "system" else tuple(path.resolver)
    resolver = Resolver(servers=servers, path=path)
    if len(_resolvers) >= MAX_RESOLVERS:
        _resolvers.clear()
    _resolvers[id(path)] = (path, resolver)
    return resolver


@functools.lru_cache(maxsize=4096)  # asked on every connection, of a few names
def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def parse_hosts(text: str) -> dict[str, list[str]]:
    """Each name (lower case) and alias of a hosts file, with its addresses in the file's order."""
    names: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and is_ip(fields[0]):
            for name in dict.fromkeys(f.lower() for f in fields[1:]):
                names.setdefault(name, []).append(fields[0])
    return names


_hosts: dict[str, tuple[tuple[int, int, int], dict[str, list[str]]]] = {}


def hosts_file(host: str, path: str = HOSTS) -> list[str]:
    """What the system's hosts file says of a name, as the system resolver would look first. The
    file is read again whenever it changed (its inode, size or mtime), as resolv.conf is."""
    try:
        stat = os.stat(path)
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        known = _hosts.get(path)
        if known is None or known[0] != key:
            known = key, parse_hosts(Path(path).read_text(encoding="utf-8", errors="replace"))
            _hosts[path] = known
    except OSError:
        return []
    return list(known[1].get(host.lower().rstrip("."), ()))


class Outcome:
    """The queries for one name, asked together: their addresses (in query order) and the
    network time, from the first send to the last answer of the queries asked side by side."""

    __slots__ = ("exchanges", "addresses", "network_ms")

    def __init__(self, exchanges: tuple[Exchange, ...]) -> None:  # on every lookup: one pass, no properties
        self.exchanges = exchanges
        addresses: list[str] = []
        start = 0
        for e in exchanges:
            if e.reply is not None:
                addresses += e.reply.addresses
            if e.started_ns and (not start or e.started_ns < start):
                start = e.started_ns
        self.addresses = addresses
        network_ms = 0.0
        if start:
            for e in exchanges:
                if e.started_ns and (e.started_ns - start) / 1e6 + e.network_ms > network_ms:
                    network_ms = (e.started_ns - start) / 1e6 + e.network_ms
        self.network_ms = network_ms

    @property
    def later_addresses(self) -> list[str]:
        return [address for e in self.exchanges for r in e.later for address in r.addresses]

    @property
    def failing(self) -> Exchange | None:
        """The query that tells why there is no address (in query order): an error rcode or no
        answer at all; None when every answer was NOERROR."""
        return next((e for e in self.exchanges if e.reply is None or e.reply.rcode != dns.rcode.NOERROR), None)

    @property
    def rcode(self) -> str | None:
        failing = None if self.addresses else self.failing
        if failing is None:
            return "NOERROR"
        return dns.rcode.to_text(failing.reply.rcode) if failing.reply else None

    def failure(self) -> Exception:
        """The exception for an outcome without addresses, as the classifier reads it."""
        failing = self.failing
        if failing is None:
            first = self.exchanges[0]
            kinds = "/".join(dns.rdatatype.to_text(e.rdtype) for e in self.exchanges)
            detail = f"no {kinds} records for {first.name} from {first.server}"
            return ProbeFailure(dns_failure(dns.rcode.NOERROR), RESOLVE, detail)
        asked = f"{failing.name} {dns.rdatatype.to_text(failing.rdtype)}"
        if failing.reply is not None:
            rcode = failing.reply.rcode
            detail = f"{dns.rcode.to_text(rcode)} for {asked} from {failing.server}"
            return ProbeFailure(dns_failure(rcode), RESOLVE, detail)
        if failing.error is None or isinstance(failing.error, TimeoutError):
            return TimeoutError(f"no answer for {asked}")
        return failing.error


@functools.lru_cache(maxsize=4096)  # asked on every lookup, of a few names; a bad name is not kept
def _name(text: str) -> dns.name.Name:
    try:
        return dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        raise ProbeFailure("dns_bad_name", RESOLVE, f"{text!r} is not a domain name: {exc}") from exc


async def _ask(
    conf: ResolvConf,
    path: PathSpec | None,
    name: dns.name.Name,
    rdtypes: Sequence[dns.rdatatype.RdataType],
    linger_s: float = 0,
) -> Outcome:
    return Outcome(await exchange(name, rdtypes, conf.servers, conf.options, path, linger_s))


async def _search_domains(
    conf: ResolvConf, path: PathSpec | None, host: str, first: Outcome | None
) -> tuple[Outcome, float]:
    """The rest of glibc's res_search after the name as written (`first`, when it was asked
    first and gave no address): the search domains, then the name as written if not asked
    yet. The outcome that decides and the network time of every name asked."""
    asked: list[Outcome] = [first] if first else []

    async def ask(text: str) -> Outcome:
        asked.append(await _ask(conf, path, _name(text), ADDRESS_TYPES))
        return asked[-1]

    def spent() -> float:
        return sum(o.network_ms for o in asked)

    nodata = servfail = None
    for domain in conf.search:
        outcome = await ask(f"{host}.{domain}")
        if outcome.addresses:
            return outcome, spent()
        failing = outcome.failing
        if failing is None:
            nodata = nodata or outcome
        elif failing.reply is None and isinstance(failing.error, ConnectionRefusedError):
            return outcome, spent()  # no server to ask: glibc gives up at once
        elif failing.reply is not None and failing.reply.rcode == dns.rcode.SERVFAIL:
            servfail = servfail or outcome
        elif failing.reply is None or failing.reply.rcode != dns.rcode.NXDOMAIN:
            break  # another error ends the search; the name as written is still asked
    if first is None:
        last = await ask(host)
        if last.addresses:
            return last, spent()
    return first or nodata or servfail or asked[-1], spent()


async def lookup(resolver: Resolver, host: str, trace: Trace) -> list[str]:
    """Addresses for a connection, IPv4 first; records the resolve phase and the answers."""
    if is_ip(host):
        return [host.strip("[]")]
    trace.operation = RESOLVE
    trace.fact("resolver", resolver.label)
    started = time.perf_counter()
    if not resolver.servers and (found := hosts_file(host, resolver.hosts)):
        trace.phase("resolve", (time.perf_counter() - started) * 1000)  # no network: the file's reading
        addresses = found
    else:
        try:  # A and AAAA through the search domains, in glibc's res_search order
            conf = resolver.settings()
            if host.endswith(".") or host.count(".") >= conf.options.ndots:  # the name as written first
                outcome = Outcome(await exchange(_name(host), ADDRESS_TYPES, conf.servers, conf.options, resolver.path))
                network_ms = outcome.network_ms
                if not outcome.addresses and not host.endswith("."):
                    outcome, network_ms = await _search_domains(conf, resolver.path, host, outcome)
            else:
                outcome, network_ms = await _search_domains(conf, resolver.path, host, None)
        except BaseException:
            trace.phase("resolve", (time.perf_counter() - started) * 1000)  # no answer: the time seen from here
            raise
        trace.phase("resolve", network_ms)
        addresses = outcome.addresses
        if not addresses:
            raise outcome.failure()
    if len(addresses) == 1:
        ordered = addresses
    else:
        ordered = sorted(dict.fromkeys(addresses), key=lambda a: ":" in a)[:MAX_ANSWERS]
    trace.fact("addresses", tuple(ordered))
    return ordered


async def probe_dns(
    target: Target, path: PathSpec, trace: Trace, *, settings: ProbeSettings, ssl_context: ssl.SSLContext
) -> None:
    """The target's queries for its name as written; answers and rcode are facts either way,
    and every answer that came within `probe.dns_linger_s` of the first."""
    check_bind(path)
    resolver = resolver_for(path)
    trace.operation = RESOLVE
    trace.fact("resolver", resolver.label)
    started = time.perf_counter()
    try:
        rdtypes = [dns.rdatatype.from_text(qtype) for qtype in target.qtypes]
        outcome = await _ask(
            resolver.settings(), resolver.path, _name(target.host or ""), rdtypes, settings.dns_linger_s
        )
    except BaseException:
        trace.phase("resolve", (time.perf_counter() - started) * 1000)
        raise
    trace.phase("resolve", outcome.network_ms)
    trace.fact("addresses", tuple(dict.fromkeys(outcome.addresses + outcome.later_addresses))[:MAX_ANSWERS])
    trace.fact("dns_rcode", outcome.rcode)
    if conflicts := [e.describe() for e in outcome.exchanges if e.conflicting]:
        raise ProbeFailure(DNS_ANSWERS_CONFLICT, RESOLVE, "answers differ: " + " | ".join(conflicts))
    if not outcome.addresses:
        raise outcome.failure()
