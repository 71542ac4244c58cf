"""The classifier is a pure function: every exception a probe can meet has a specific string."""

from __future__ import annotations

import asyncio
import errno
import ssl

import dns.rcode
import httpx
import pytest

from probe.errors import ProbeFailure
from probe.measure.failures import ERRNO_FAILURES, classify, dns_failure


def _verify_error(code: int) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_code = code
    return exc


def _wrapped(cause: BaseException, outer: type[Exception]) -> Exception:
    """A cause re-raised inside another exception is still the cause."""
    try:
        raise outer("wrapped") from cause
    except Exception as exc:
        return exc


EXPECTED: list[tuple[BaseException, str]] = [
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "connection_refused"),
    (ConnectionResetError(errno.ECONNRESET, "reset"), "connection_reset"),
    (ConnectionAbortedError(errno.ECONNABORTED, "aborted"), "connection_aborted"),
    (BrokenPipeError(errno.EPIPE, "pipe"), "connection_reset"),
    (OSError(errno.EHOSTUNREACH, "no route"), "host_unreachable"),
    (OSError(errno.ENETUNREACH, "unreachable"), "network_unreachable"),
    (OSError(errno.ENETDOWN, "down"), "network_unreachable"),
    (OSError(errno.ETIMEDOUT, "timed out"), "generic_timeout_error"),
    (OSError(errno.EADDRNOTAVAIL, "cannot assign"), "address_not_available"),
    (OSError(errno.ENODEV, "no device"), "interface_not_found"),
    (PermissionError(errno.EPERM, "not permitted"), "operation_not_permitted"),
    (TimeoutError(), "generic_timeout_error"),
    (asyncio.IncompleteReadError(b"", 2), "eof_error"),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "eof_error"),
    (ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"), "eof_error"),
    (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), "ssl_failed_handshake"),
    (_verify_error(62), "ssl_invalid_hostname"),
    (_verify_error(64), "ssl_invalid_hostname"),
    (_verify_error(20), "ssl_unknown_authority"),
    (_verify_error(19), "ssl_unknown_authority"),
    (_verify_error(18), "ssl_unknown_authority"),
    (_verify_error(10), "ssl_invalid_certificate"),
    (_verify_error(9), "ssl_invalid_certificate"),
    (httpx.InvalidURL("bad"), "http_invalid_redirect_location_host"),
    (_wrapped(ConnectionResetError(errno.ECONNRESET, "reset"), RuntimeError), "connection_reset"),
    (_wrapped(_verify_error(62), RuntimeError), "ssl_invalid_hostname"),
    (_wrapped(ProbeFailure(dns_failure(dns.rcode.NXDOMAIN), "resolve"), RuntimeError), "dns_nxdomain_error"),
    (EOFError("the DNS server closed the TCP connection"), "eof_error"),
    (ProbeFailure("proxy_auth_failed", "proxy_auth"), "proxy_auth_failed"),
]


@pytest.mark.parametrize(("exc", "failure"), EXPECTED, ids=[f"{type(e).__name__}-{f}" for e, f in EXPECTED])
def test_exception_maps_to_its_failure(exc: BaseException, failure: str) -> None:
    assert classify(exc) == failure


@pytest.mark.parametrize("code", sorted(ERRNO_FAILURES))
def test_every_listed_errno_is_specific(code: int) -> None:
    assert not classify(OSError(code, "x")).startswith("unknown_failure")


RCODES = [
    (dns.rcode.NOERROR, "dns_no_answer"),
    (dns.rcode.NXDOMAIN, "dns_nxdomain_error"),
    (dns.rcode.SERVFAIL, "dns_servfail_error"),
    (dns.rcode.REFUSED, "dns_refused_error"),
    (dns.rcode.FORMERR, "dns_server_misbehaving"),
    (dns.rcode.NOTIMP, "dns_server_misbehaving"),
]


@pytest.mark.parametrize(("rcode", "failure"), RCODES, ids=[f"{r.name}-{f}" for r, f in RCODES])
def test_a_dns_answer_without_addresses_maps_by_its_rcode(rcode: dns.rcode.Rcode, failure: str) -> None:
    assert dns_failure(rcode) == failure


@pytest.mark.parametrize("rcode", list(dns.rcode.Rcode))
def test_every_rcode_is_specific(rcode: dns.rcode.Rcode) -> None:
    assert not classify(ProbeFailure(dns_failure(rcode), "resolve")).startswith("unknown_failure")


def test_unknown_exception_is_labelled_unknown_with_its_detail() -> None:
    assert classify(ValueError("odd")) == "unknown_failure: ValueError: odd"


def test_cause_loops_do_not_hang() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert classify(a).startswith("unknown_failure")
