"""TCP plus a TLS handshake with SNI through a path."""

from __future__ import annotations

import ssl
from datetime import UTC
from urllib.parse import urlsplit

from probe.config import PathSpec, ProbeSettings, Target
from probe.measure.paths import open_stream, start_tls
from probe.model import Trace

CERT_FAILURES = frozenset({"ssl_invalid_hostname", "ssl_unknown_authority", "ssl_invalid_certificate"})


async def probe_tls(
    target: Target, path: PathSpec, trace: Trace, *, settings: ProbeSettings, ssl_context: ssl.SSLContext
) -> None:
    conn = await open_stream(path, target.host or "", target.port or 0, trace)
    try:
        await start_tls(conn, ssl_context, target.sni or target.host or "", trace)
    finally:
        conn.close()


def _endpoint(target: Target) -> tuple[str, int, str]:
    if target.kind == "http":
        url = urlsplit(target.url or "")
        return url.hostname or "", url.port or 443, url.hostname or ""
    return target.host or "", target.port or 443, target.sni or target.host or ""


async def peek_certificate(target: Target, path: PathSpec, trace: Trace, unverified: ssl.SSLContext) -> None:
    """After a failed verification, handshake once more without verifying, only to record the
    certificate that was shown: a censor's interception shows its own issuer."""
    from cryptography import x509  # only on this path

    host, port, sni = _endpoint(target)
    conn = await open_stream(path, host, port, Trace())
    try:
        await conn.start_tls(unverified, sni)
        der = conn.ssl_object.getpeercert(binary_form=True) if conn.ssl_object else None
    finally:
        conn.close()
    if der:
        cert = x509.load_der_x509_certificate(der)
        trace.fact("cert_subject", cert.subject.rfc4514_string())
        trace.fact("cert_issuer", cert.issuer.rfc4514_string())
        trace.fact("cert_not_after", cert.not_valid_after_utc.astimezone(UTC))
