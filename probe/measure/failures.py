"""Exception -> OONI failure string. Pure and table-driven.

asyncio and our own code may wrap the real cause, so the classifier walks
``__cause__``/``__context__`` to the first exception it has a specific entry for:
an ``OSError`` errno, an ``ssl`` error, or our own ``ProbeFailure`` (which DNS failures are,
their string taken from the answer's rcode by ``dns_failure``).
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections.abc import Iterator

import dns.rcode
import httpx

from probe.errors import ProbeFailure

TIMEOUT = "generic_timeout_error"

ERRNO_FAILURES: dict[int, str] = {
    errno.ECONNREFUSED: "connection_refused",
    errno.ECONNRESET: "connection_reset",
    errno.ECONNABORTED: "connection_aborted",
    errno.EHOSTUNREACH: "host_unreachable",
    errno.EHOSTDOWN: "host_unreachable",
    errno.ENETUNREACH: "network_unreachable",
    errno.ENETDOWN: "network_unreachable",
    errno.ETIMEDOUT: TIMEOUT,
    errno.EPIPE: "connection_reset",
    errno.EADDRNOTAVAIL: "address_not_available",
    errno.ENODEV: "interface_not_found",
    errno.EPERM: "operation_not_permitted",
    errno.EACCES: "operation_not_permitted",
    errno.EPROTO: "protocol_error",
}

# The rcode of a DNS answer without the addresses asked for -> its failure; any other rcode
# (FORMERR, NOTIMP, ...) is the server misbehaving.
RCODE_FAILURES: dict[dns.rcode.Rcode, str] = {
    dns.rcode.NOERROR: "dns_no_answer",
    dns.rcode.NXDOMAIN: "dns_nxdomain_error",
    dns.rcode.SERVFAIL: "dns_servfail_error",
    dns.rcode.REFUSED: "dns_refused_error",
}
# Two answers to one query that disagree: one was forged on the way (probe/measure/resolver.py).
DNS_ANSWERS_CONFLICT = "dns_answers_conflict"

# OpenSSL X509_V_ERR_* codes carried by ssl.SSLCertVerificationError.verify_code.
UNKNOWN_AUTHORITY_CODES = frozenset({2, 18, 19, 20, 21})
HOSTNAME_MISMATCH_CODES = frozenset({62, 64})

# Exception classes with one meaning, most specific first (checked with isinstance).
CLASS_FAILURES: tuple[tuple[type[BaseException], str], ...] = (
    (ProbeFailure, ""),  # carries its own string
    (ssl.SSLEOFError, "eof_error"),
    (ssl.SSLZeroReturnError, "eof_error"),
    (asyncio.IncompleteReadError, "eof_error"),
    (EOFError, "eof_error"),
    (TimeoutError, TIMEOUT),
    (httpx.InvalidURL, "http_invalid_redirect_location_host"),
)


def dns_failure(rcode: dns.rcode.Rcode) -> str:
    """The failure of a DNS answer with this rcode and no address."""
    return RCODE_FAILURES.get(rcode, "dns_server_misbehaving")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _ssl_failure(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in UNKNOWN_AUTHORITY_CODES:
            return "ssl_unknown_authority"
        if code in HOSTNAME_MISMATCH_CODES:
            return "ssl_invalid_hostname"
        return "ssl_invalid_certificate"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "eof_error"
    return "ssl_failed_handshake"


def _specific(exc: BaseException) -> str | None:
    if isinstance(exc, ProbeFailure):
        return exc.failure
    if isinstance(exc, ssl.SSLError):
        return _ssl_failure(exc)
    if isinstance(exc, OSError) and exc.errno in ERRNO_FAILURES:
        return ERRNO_FAILURES[exc.errno]
    return None


def classify(exc: BaseException) -> str:
    """The OONI failure string for an exception met while probing."""
    for link in _chain(exc):
        failure = _specific(link)
        if failure:
            return failure
    for link in _chain(exc):
        for cls, failure in CLASS_FAILURES:
            if failure and isinstance(link, cls):
                return failure
    return f"unknown_failure: {type(exc).__name__}: {exc}"
