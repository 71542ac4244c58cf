"""A round: every (target, path) pair probed once, concurrently, with bounded concurrency.

Tasks start target by target, so every path of one target is measured within the same
few seconds: the pairing that direct-versus-tunnel verdicts need.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import certifi
import uvloop

from probe.config import Config, Endpoint, PathSpec, ProbeSettings, Target
from probe.errors import ProbeFailure
from probe.measure.dns import probe_dns
from probe.measure.failures import classify
from probe.measure.http import probe_http
from probe.measure.lag import LagMonitor
from probe.measure.tcp import probe_tcp
from probe.measure.tls import CERT_FAILURES, peek_certificate, probe_tls
from probe.measure.udp_endpoint import probe_udp_endpoint
from probe.model import Heartbeat, Measurement, Trace

log = logging.getLogger(__name__)
T = TypeVar("T")


class Probe(Protocol):
    """What every probe is: `target` measured through `path`, its phases and facts recorded
    in `trace`. A failure raises (ProbeFailure, or what the network raised); `measure` makes
    it a value."""

    def __call__(
        self, target: Target, path: PathSpec, trace: Trace, *, settings: ProbeSettings, ssl_context: ssl.SSLContext
    ) -> Awaitable[None]: ...


PROBES: dict[str, Probe] = {"http": probe_http, "tls": probe_tls, "tcp": probe_tcp, "dns": probe_dns}
ENDPOINT_GROUP = "endpoint"
DIRECT = PathSpec(name="direct", kind="direct")
CERT_PEEK_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class ProbeContext:
    """What every probe shares, built once per configuration: TLS context and settings."""

    config: Config
    ssl_context: ssl.SSLContext
    unverified_ssl_context: ssl.SSLContext  # only to record a certificate that failed verification
    lag: LagMonitor = field(default_factory=LagMonitor)

    @classmethod
    def build(cls, config: Config, lag: LagMonitor | None = None) -> ProbeContext:
        cafile = str(config.probe.ca_file) if config.probe.ca_file else certifi.where()
        context = ssl.create_default_context(cafile=cafile)
        context.set_alpn_protocols(["http/1.1"])
        unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        return cls(config=config, ssl_context=context, unverified_ssl_context=unverified, lag=lag or LagMonitor())


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run the probing event loop: uvloop's, which serves the probes' sockets at about twice
    the rate of asyncio's own (bench/RESULTS.md). What start-up made (modules, the config, TLS
    contexts) is collected once and frozen first: otherwise the collector's first full pass
    walks it all while the first probes run, holding the loop some 15 ms (their totals then
    count as loop-late and are left out of latency)."""
    gc.collect()
    gc.freeze()
    return uvloop.run(main)


def new_round_id(now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]


def endpoint_target(path: PathSpec) -> Target | None:
    """The tunnel server's own port, probed directly: a TCP connect, or on a UDP port the
    protocol's first handshake, its kind "openvpn" or "wireguard" (never a kind a config's
    target takes, so built here without the targets' validation)."""
    if path.endpoint is None:
        return None
    kind = path.endpoint.protocol if path.endpoint.transport == "udp" else "tcp"
    return Target.model_construct(
        name=f"{path.name}-endpoint",
        group=ENDPOINT_GROUP,
        kind=kind,
        host=path.endpoint.host,
        port=path.endpoint.port,
    )


def _udp_endpoint(config: Config, target: Target) -> Endpoint | None:
    """The UDP endpoint this target probes, if it is one."""
    if target.group != ENDPOINT_GROUP or target.kind in PROBES:
        return None
    return next((p.endpoint for p in config.paths if f"{p.name}-endpoint" == target.name), None)


def path_rows(config: Config) -> list[tuple[str, str, str, str | None]]:
    """The paths as the store records them: name, kind, label, endpoint target."""
    return [(p.name, p.kind, p.label, t.name if (t := endpoint_target(p)) else None) for p in config.paths]


def plan(config: Config, targets: Iterable[str] = (), paths: Iterable[str] = ()) -> list[tuple[Target, PathSpec]]:
    """The pairs of one round, target-major. DNS targets need a resolver the path controls,
    so they are probed on direct and bind paths only."""
    wanted_targets, wanted_paths = set(targets), set(paths)
    chosen_paths = [p for p in config.paths if not wanted_paths or p.name in wanted_paths]
    pairs = [
        (target, path)
        for target in config.targets
        if not wanted_targets or target.name in wanted_targets
        for path in chosen_paths
        if target.kind != "dns" or path.kind in ("direct", "bind")
    ]
    if not wanted_targets:
        pairs += [(t, DIRECT) for p in chosen_paths if (t := endpoint_target(p))]
    return pairs


async def measure(ctx: ProbeContext, target: Target, path: PathSpec, round_id: str) -> Measurement:
    """Probe one target over one path. Never raises for a network failure."""
    settings = ctx.config.probe
    ctx.lag.ensure_running()
    trace = Trace()
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    failure: str | None = None
    operation: str | None = None
    detail = ""
    try:
        async with asyncio.timeout(target.timeout_s or settings.timeout_s):
            if (endpoint := _udp_endpoint(ctx.config, target)) is not None:
                await probe_udp_endpoint(endpoint, path, trace)
            else:
                await PROBES[target.kind](target, path, trace, settings=settings, ssl_context=ctx.ssl_context)
    except Exception as exc:  # the boundary where network failures become values
        failure = classify(exc)
        operation = exc.operation if isinstance(exc, ProbeFailure) else trace.operation
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if failure.startswith("unknown_failure"):
            log.warning("unclassified failure probing %s via %s", target.name, path.name, exc_info=exc)
    if failure in CERT_FAILURES:
        await _record_certificate(ctx, target, path, trace)
    total_ms = (time.perf_counter() - started) * 1000
    phases, facts = trace.phases_ms, trace.facts
    return Measurement(
        vantage=ctx.config.vantage.name,
        round_id=round_id,
        target=target.name,
        group=target.group,
        path=path.name,
        kind=target.kind,
        input=target.input,
        started_at=started_at,
        ok=failure is None,
        failure=failure,
        failed_operation=operation,
        resolve_ms=phases.get("resolve"),
        proxy_ms=phases.get("proxy"),
        connect_ms=phases.get("connect"),
        tls_ms=phases.get("tls"),
        first_byte_ms=phases.get("first_byte"),
        total_ms=round(total_ms, 3),
        resolver=facts.get("resolver"),
        dns_rcode=facts.get("dns_rcode"),
        addresses=tuple(facts.get("addresses", ())),
        peer_address=facts.get("peer_address"),
        status=facts.get("status"),
        final_url=facts.get("final_url"),
        body_length=facts.get("body_length"),
        body_sha256=facts.get("body_sha256"),
        title=facts.get("title"),
        tls_version=facts.get("tls_version"),
        cert_subject=facts.get("cert_subject"),
        cert_issuer=facts.get("cert_issuer"),
        cert_not_after=facts.get("cert_not_after"),
        tls_verified=facts.get("tls_verified"),
        loop_lag_ms=ctx.lag.worst(started),
        detail=detail,
    )


async def _record_certificate(ctx: ProbeContext, target: Target, path: PathSpec, trace: Trace) -> None:
    try:
        async with asyncio.timeout(CERT_PEEK_TIMEOUT_S):
            await peek_certificate(target, path, trace, ctx.unverified_ssl_context)
    except Exception as exc:  # the certificate is a bonus fact; the failure is already recorded
        log.debug("could not record the certificate of %s via %s: %s", target.name, path.name, exc)


async def run_round(
    ctx: ProbeContext,
    pairs: list[tuple[Target, PathSpec]],
    round_id: str | None = None,
    *,
    target: str | None = None,
    scheduled_at: datetime | None = None,
) -> tuple[list[Measurement], Heartbeat]:
    settings = ctx.config.probe
    started_at = datetime.now(UTC)
    round_id = round_id or new_round_id(started_at)
    everyone = asyncio.Semaphore(settings.concurrency)
    per_path = {path.name: asyncio.Semaphore(settings.per_path_concurrency) for _, path in pairs}

    async def one(target: Target, path: PathSpec) -> Measurement:
        async with per_path[path.name], everyone:
            return await measure(ctx, target, path, round_id)

    measurements = list(await asyncio.gather(*(one(t, p) for t, p in pairs)))
    heartbeat = Heartbeat(
        vantage=ctx.config.vantage.name,
        round_id=round_id,
        started_at=started_at,
        finished_at=datetime.now(UTC),
        probes=len(measurements),
        succeeded=sum(m.ok for m in measurements),
        config_sha256=ctx.config.sha256,
        target=target,
        scheduled_at=scheduled_at,
    )
    return measurements, heartbeat
