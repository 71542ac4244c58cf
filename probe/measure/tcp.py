"""TCP connect to host:port through a path."""

from __future__ import annotations

from typing import Any

from probe.config import PathSpec, Target
from probe.measure.paths import open_stream
from probe.model import Trace


async def probe_tcp(target: Target, path: PathSpec, trace: Trace, **_: object) -> dict[str, Any]:
    (await open_stream(path, target.host or "", target.port or 0, trace)).close()
    return {}
