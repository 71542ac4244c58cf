"""TCP connect to host:port through a path."""

from __future__ import annotations

import ssl

from probe.config import PathSpec, ProbeSettings, Target
from probe.measure.paths import open_stream
from probe.model import Trace


async def probe_tcp(
    target: Target, path: PathSpec, trace: Trace, *, settings: ProbeSettings, ssl_context: ssl.SSLContext
) -> None:
    (await open_stream(path, target.host or "", target.port or 0, trace)).close()
