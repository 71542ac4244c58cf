"""Build stores of known measurements for the analysis tests: scenarios as data."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from probe.model import Heartbeat, Measurement
from probe.store.sqlite import open_store

T0 = datetime(2018, 3, 1, tzinfo=UTC)
INTERVAL = timedelta(minutes=5)
PATHS = [
    ("direct", "direct", "", None),
    ("vpn", "socks5", "shadowsocks", "vpn-endpoint"),
    ("wg", "bind", "wireguard", None),
]
PAGE = {"status": 200, "title": "Example", "body_length": 5000, "addresses": ("93.184.216.34",)}
TARGETS = {"news": "blocked", "search": "blocked", "portal": "control", "shop": "control"}

OK = dict(ok=True, **PAGE)


def fail(failure: str, operation: str, **facts: Any) -> dict[str, Any]:
    return {"ok": False, "failure": failure, "failed_operation": operation, **facts}


def measurement(at: datetime, target: str, path: str, outcome: dict[str, Any], round_id: str) -> Measurement:
    facts = {"connect_ms": 20.0, "first_byte_ms": 60.0, **outcome}
    facts["addresses"] = tuple(facts.get("addresses", ()))
    return Measurement(
        vantage="lab",
        round_id=round_id,
        target=target,
        group="endpoint" if target.endswith("-endpoint") else TARGETS.get(target, "blocked"),
        path=path,
        kind="tcp" if target.endswith("-endpoint") else "http",
        input=f"https://{target}.example/",
        started_at=at,
        **facts,
    )


def build_store(
    db: Path,
    rounds: Iterable[tuple[int, dict[str, dict[str, dict[str, Any]]]]],
    start: datetime = T0,
    interval: timedelta = INTERVAL,
) -> None:
    """rounds: (round index, {target: {path: outcome}}). Each target is its own round, as the
    daemon runs it, a few seconds apart within the slot."""
    store = open_store(db)
    store.record_paths(PATHS)
    measurements, heartbeats = [], []
    for index, targets in rounds:
        for offset, (target, by_path) in enumerate(targets.items()):
            at = start + index * interval + timedelta(seconds=offset * 10)
            round_id = f"r{index}-{target}"
            batch = [
                measurement(at + timedelta(milliseconds=i), target, path, outcome, round_id)
                for i, (path, outcome) in enumerate(by_path.items())
            ]
            measurements += batch
            heartbeats.append(
                Heartbeat(
                    vantage="lab",
                    round_id=round_id,
                    started_at=at,
                    finished_at=at + timedelta(seconds=2),
                    probes=len(batch),
                    succeeded=sum(m.ok for m in batch),
                    target=target,
                    scheduled_at=at,
                )
            )
    store.write(measurements, heartbeats)
    store.close()


def everything(
    outcome_for: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """One slot: every target through every path, OK unless outcome_for says otherwise."""
    outcome_for = outcome_for or {}
    rounds: dict[str, dict[str, dict[str, Any]]] = {}
    for target in TARGETS:
        rounds[target] = {path: outcome_for.get((target, path), OK) for path, *_ in PATHS}
    rounds["vpn-endpoint"] = {"direct": outcome_for.get(("vpn-endpoint", "direct"), {"ok": True})}
    return rounds


def dumps(addresses: Iterable[str]) -> str:
    return json.dumps(list(addresses))


WEEK = datetime(2018, 3, 4, 16, tzinfo=UTC)  # Monday 2018-03-05 00:00 in Beijing, during the NPC
BEIJING_HOUR = timedelta(hours=1)


def realistic_week(db: Path, seed: int = 7) -> None:
    """A week at 5-minute rounds, Monday 2018-03-05 in Beijing, with: a tunnel crackdown
    (Tuesday 10:00 to Wednesday 02:00), DNS poisoning of one site (Thursday 08:00-20:00),
    throttling of the direct path (Friday 18:00-22:00), the daemon stopped (Saturday
    03:00-09:00), and noise: now and then a failed probe."""
    import random

    rng = random.Random(seed)
    base = {"direct": 35.0, "vpn": 160.0, "wg": 120.0}

    def within(i: int, day: int, start_h: int, end_h: float) -> bool:
        hour = i * 5 / 60
        return day * 24 + start_h <= hour < day * 24 + end_h

    rounds = []
    for i in range(7 * 24 * 12):
        if within(i, 5, 3, 9):
            continue  # the daemon was stopped
        outcomes: dict[tuple[str, str], dict[str, Any]] = {}
        for target in TARGETS:
            for path, mean in base.items():
                slow = 5 if path == "direct" and within(i, 4, 18, 22) else 1
                outcome = dict(
                    OK,
                    connect_ms=round(rng.lognormvariate(0, 0.25) * mean * slow, 2),
                    first_byte_ms=round(rng.lognormvariate(0, 0.3) * mean * 2.5 * slow, 2),
                )
                if TARGETS[target] == "blocked" and path == "direct":
                    outcome = fail("connection_reset", "tls_handshake")  # always blocked directly
                if path == "vpn" and within(i, 1, 10, 26):
                    outcome = fail("eof_error", "http_round_trip")
                if target == "news" and path == "direct" and within(i, 3, 8, 20):
                    outcome = fail("generic_timeout_error", "connect", addresses=("10.10.34.35",))
                if rng.random() < 0.01:
                    outcome = fail("generic_timeout_error", "http_round_trip")
                outcomes[(target, path)] = outcome
        crackdown = within(i, 1, 10, 26)
        outcomes[("vpn-endpoint", "direct")] = fail("generic_timeout_error", "connect") if crackdown else {"ok": True}
        rounds.append((i, everything(outcomes)))
    build_store(db, rounds, start=WEEK)


def analysis_config(tmp: Path, db: Path, extra: str = "") -> Path:
    """A config for analysing a store built here: its store path, one target, the direct path."""
    path = tmp / "tunnelwatch.toml"
    path.write_text(f"""
[vantage]
name = "beijing-lab"
[store]
path = "{db}"
{extra}
[[targets]]
name = "news"
group = "blocked"
kind = "http"
url = "https://news.example/"
[[paths]]
name = "direct"
kind = "direct"
""")
    return path
