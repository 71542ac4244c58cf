"""DNS through a path's resolver: aiodns (c-ares) on a fresh channel for every lookup.

c-ares caches answers for up to an hour and pycares has no switch to turn that off, so a
channel kept across probes would measure its cache instead of the network.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodns
import aiodns.error as ares

from .config import PathSpec, Target
from .model import RESOLVE, Trace
from .sockets import check_bind

# c-ares error code -> the DNS rcode the server sent (None: no answer came back at all).
ARES_RCODES = {
    ares.ARES_ENOTFOUND: "NXDOMAIN",
    ares.ARES_ENODATA: "NOERROR",
    ares.ARES_ESERVFAIL: "SERVFAIL",
    ares.ARES_EREFUSED: "REFUSED",
    ares.ARES_EFORMERR: "FORMERR",
    ares.ARES_ENOTIMP: "NOTIMP",
}
CHANNEL_TIMEOUT_S = 4.0
MAX_ANSWERS = 32  # addresses recorded of one answer (a 64 KiB answer holds thousands)


@dataclass(frozen=True, slots=True)
class Resolver:
    """Where a path's names are resolved: explicit servers, or the system's resolv.conf."""

    servers: tuple[str, ...] = ()
    local_ip: str | None = None
    local_dev: str | None = None

    @property
    def label(self) -> str:
        return ",".join(self.servers) if self.servers else "system"

    def channel(self) -> aiodns.DNSResolver:
        options: dict[str, Any] = {"timeout": CHANNEL_TIMEOUT_S, "tries": 1}
        if self.local_ip:
            options["local_ip"] = self.local_ip
        if self.local_dev:
            options["local_dev"] = self.local_dev
        return aiodns.DNSResolver(nameservers=list(self.servers) or None, **options)


def resolver_for(path: PathSpec) -> Resolver:
    servers = () if path.resolver == "system" else tuple(path.resolver)
    return Resolver(servers=servers, local_ip=path.address, local_dev=path.interface)


@functools.lru_cache(maxsize=4096)  # asked on every connection, of a few names
def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


async def lookup(resolver: Resolver, host: str, trace: Trace) -> list[str]:
    """Addresses for a connection, IPv4 first; records the resolve phase and the answers."""
    if is_ip(host):
        return [host.strip("[]")]
    trace.operation = RESOLVE
    trace.fact("resolver", resolver.label)
    started = time.perf_counter()
    channel = resolver.channel()
    try:
        addresses = (None if resolver.servers else hosts_file(host)) or await _query_addresses(channel, host)
    finally:
        trace.phase("resolve", (time.perf_counter() - started) * 1000)
        await channel.close()
    ordered = sorted(dict.fromkeys(addresses), key=lambda a: ":" in a)[:MAX_ANSWERS]
    trace.fact("addresses", tuple(ordered))
    return ordered


def hosts_file(host: str, path: str = "/etc/hosts") -> list[str]:
    """What the system's hosts file says of a name, as the system resolver would look first.
    (c-ares' getaddrinfo would do this too, but it failed now and then with "Could not
    contact DNS servers" while queries ran side by side; plain queries do not.)"""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    name = host.lower().rstrip(".")
    found = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and name in (f.lower() for f in fields[1:]) and is_ip(fields[0]):
            found.append(fields[0])
    return found


async def _query_addresses(channel: aiodns.DNSResolver, host: str) -> list[str]:
    """A and AAAA from explicit servers; the first error if neither gave an address."""
    results = await asyncio.gather(channel.query_dns(host, "A"), channel.query_dns(host, "AAAA"),
                                   return_exceptions=True)  # fmt: skip
    addresses = [
        addr
        for result in results
        if not isinstance(result, BaseException)
        for record in result.answer
        if (addr := getattr(record.data, "addr", None))
    ]
    if not addresses:
        errors = sorted((r for r in results if isinstance(r, BaseException)), key=lambda e: _rcode(e) == "NOERROR")
        if errors:
            raise errors[0]
        raise ares.DNSError(ares.ARES_ENODATA, f"no A or AAAA records for {host}")
    return addresses


def _rcode(exc: BaseException) -> str | None:
    if isinstance(exc, ares.DNSError) and exc.args:
        return ARES_RCODES.get(exc.args[0])
    return None


async def probe_dns(target: Target, path: PathSpec, trace: Trace, **_: object) -> dict[str, Any]:
    """A and AAAA queries for the target's name; answers and rcode are facts either way."""
    check_bind(path)
    resolver = resolver_for(path)
    trace.operation = RESOLVE
    trace.fact("resolver", resolver.label)
    started = time.perf_counter()
    channel = resolver.channel()
    try:
        results = await asyncio.gather(
            *(channel.query_dns(target.host or "", qtype) for qtype in target.qtypes),
            return_exceptions=True,
        )
    finally:
        trace.phase("resolve", (time.perf_counter() - started) * 1000)
        await channel.close()
    answers: list[str] = []
    errors: list[BaseException] = []
    for result in results:
        if isinstance(result, BaseException):
            errors.append(result)
            continue
        for record in result.answer:
            addr = getattr(record.data, "addr", None)
            if addr:
                answers.append(addr)
    trace.fact("addresses", tuple(answers[:MAX_ANSWERS]))
    if answers:
        trace.fact("dns_rcode", "NOERROR")
        return {}
    if not errors:
        trace.fact("dns_rcode", "NOERROR")
        raise ares.DNSError(ares.ARES_ENODATA, "no A or AAAA records in the answer")
    # No usable answer: the most telling error decides (NXDOMAIN over "no data").
    errors.sort(key=lambda e: _rcode(e) == "NOERROR")
    trace.fact("dns_rcode", _rcode(errors[0]))
    raise errors[0]
