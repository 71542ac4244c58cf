"""TCP plus a TLS handshake with SNI through a path."""

from __future__ import annotations

import ssl
from typing import Any

from .config import PathSpec, Target
from .model import Trace
from .paths import open_stream, start_tls


async def probe_tls(
    target: Target, path: PathSpec, trace: Trace, *, ssl_context: ssl.SSLContext, **_: object
) -> dict[str, Any]:
    _, writer = await open_stream(path, target.host or "", target.port or 0, trace)
    try:
        await start_tls(writer, ssl_context, target.sni or target.host or "", trace)
    finally:
        writer.transport.abort()
    return {}
