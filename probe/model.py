"""Pure data: what a probe measured. No I/O here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# Operations, as OONI names them, plus the steps a path adds before the target is reached.
RESOLVE = "resolve"
CONNECT = "connect"
TLS_HANDSHAKE = "tls_handshake"
HTTP_ROUND_TRIP = "http_round_trip"
BIND = "bind"
PROXY_CONNECT = "proxy_connect"
PROXY_AUTH = "proxy_auth"
TUNNEL_BOOTSTRAP = "tunnel_bootstrap"  # a tunnel that never came up (OONI's tor, psiphon..., imported)

# A failure in one of these is the path's own failure, not the target's.
PATH_OPERATIONS = frozenset({BIND, PROXY_CONNECT, PROXY_AUTH, TUNNEL_BOOTSTRAP})

# The timed phases of a probe, each stored as <phase>_ms; total_ms spans them all.
PHASES = ("resolve", "proxy", "connect", "tls", "first_byte")


@dataclass(frozen=True, slots=True, kw_only=True)
class Measurement:
    """One probe of one target over one path in one round: facts, not verdicts."""

    vantage: str
    round_id: str
    target: str
    group: str
    path: str
    kind: str
    input: str
    started_at: datetime
    ok: bool
    failure: str | None = None
    failed_operation: str | None = None
    resolve_ms: float | None = None
    proxy_ms: float | None = None
    connect_ms: float | None = None
    tls_ms: float | None = None
    first_byte_ms: float | None = None
    total_ms: float | None = None
    resolver: str | None = None
    dns_rcode: str | None = None
    addresses: tuple[str, ...] = ()
    peer_address: str | None = None
    status: int | None = None
    final_url: str | None = None
    body_length: int | None = None
    body_sha256: str | None = None
    title: str | None = None
    tls_version: str | None = None
    cert_subject: str | None = None
    cert_issuer: str | None = None
    cert_not_after: datetime | None = None
    tls_verified: bool | None = None
    loop_lag_ms: float | None = None  # how late the event loop ran during the probe (probe/measure/lag.py)
    detail: str = ""

    @property
    def path_failed(self) -> bool:
        """The path itself failed (proxy, authentication, bind), not the target behind it."""
        return self.failed_operation in PATH_OPERATIONS

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["addresses"] = list(self.addresses)
        for key in ("started_at", "cert_not_after"):
            if out[key] is not None:
                out[key] = out[key].isoformat()
        out["path_failed"] = self.path_failed
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """One row per round: proof that the daemon was measuring, so gaps read as unknown."""

    vantage: str
    round_id: str
    started_at: datetime
    finished_at: datetime
    probes: int
    succeeded: int
    config_sha256: str = ""
    target: str | None = None  # the daemon probes one target's paths a round; None: every target
    scheduled_at: datetime | None = None  # when the scheduler meant the round to start


@dataclass(slots=True)
class Trace:
    """Mutable scratchpad of one probe: which operation is under way and the phase times.

    Only the first value of each phase is kept, so a redirect's second connection does not
    overwrite the first connection's timings.
    """

    operation: str = CONNECT
    phases_ms: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def phase(self, name: str, ms: float) -> None:
        self.phases_ms.setdefault(name, round(ms, 3))

    def fact(self, name: str, value: Any) -> None:
        self.facts.setdefault(name, value)
