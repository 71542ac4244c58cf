"""One stored measurement as one OONI measurement: the base data format (ooni/spec
data-formats/df-000-base.md) around the test keys of OONI's `urlgetter` experiment
(nettests/ts-027-urlgetter.md: a DNS lookup, TCP connect, TLS handshake or HTTP fetch of
one input, in the dnst, tcpconnect, tlshandshake and httpt formats), which is what a
tunnelwatch probe is. Pure: no I/O.

What OONI has a key for goes there; what it has not goes under `x_` keys, which the data
formats permit anywhere: `x_verdict` (our verdict and its rule id) and `x_tunnelwatch` (the
row as stored, so that `tunnelwatch import ooni` reads an export back exactly). Phase times
are durations measured by the kernel; OONI's `t0` and `t` are laid end to end from them, so
`t - t0` is each phase as measured and `t0` leaves out the probe's own work between phases.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import dns.rcode

from probe.model import CONNECT, HTTP_ROUND_TRIP, RESOLVE, TLS_HANDSHAKE
from probe.store.schema import MEASUREMENT_COLUMNS, from_ms

DATA_FORMAT_VERSION = "0.2.0"
TEST_NAME = "urlgetter"
TEST_VERSION = "0.1.0"  # of this mapping: tunnelwatch is not OONI's urlgetter
SOFTWARE_NAME = "tunnelwatch"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# The steps of a probe that fail the exchange with the target (OONI's transaction failure).
EXCHANGE = frozenset({RESOLVE, CONNECT, TLS_HANDSHAKE, HTTP_ROUND_TRIP})
# What OONI's web_connectivity says of a page's blocking, by our verdict: none, or unknown.
NOT_BLOCKED = frozenset({"ok", "site_down"})
IMPORTED = re.compile(r"ooni-([a-z]{2})-(as\d+)")
TOR_INFO = {"exit_ip": None, "exit_name": None, "is_tor": False}


@dataclass(frozen=True, slots=True)
class Probe:
    """Where a vantage point is, as OONI says it: "ZZ" and "AS0" when not shared."""

    cc: str = "ZZ"
    asn: str = "AS0"
    network_name: str = ""

    @classmethod
    def of(cls, labels: dict[str, str]) -> Probe:
        asn = labels.get("asn", "").strip().upper()
        if asn and not asn.startswith("AS"):
            asn = f"AS{asn}"
        return cls((labels.get("cc") or "ZZ").strip().upper(), asn or "AS0", labels.get("isp", ""))

    @classmethod
    def named(cls, vantage: str) -> Probe:
        """A vantage point `tunnelwatch import ooni` named (ooni-<cc>-<asn>) is where it says."""
        match = IMPORTED.fullmatch(vantage)
        return cls(match.group(1).upper(), match.group(2).upper()) if match else cls()


@dataclass(frozen=True, slots=True)
class PathInfo:
    kind: str = ""  # direct, socks5, http, bind
    label: str = ""  # shadowsocks, wireguard...
    endpoint_target: str = ""  # the target that probes the tunnel server's port


def ooni_input(kind: str, stored: str) -> str:
    """OONI's urlgetter input for a stored input: URLs as they are, names as dnslookup://,
    host:port as tcpconnect:// or tlshandshake://."""
    if kind == "http":
        return stored
    scheme = {"dns": "dnslookup", "tcp": "tcpconnect", "tls": "tlshandshake"}.get(kind, kind)
    return f"{scheme}://{stored}"


def _host_port(kind: str, stored: str) -> tuple[str, int | None]:
    if kind == "http":
        parts = urlsplit(stored)
        try:
            port = parts.port
        except ValueError:
            port = None
        return parts.hostname or "", port or (443 if parts.scheme == "https" else 80)
    if kind == "dns":
        return stored, None
    host, _, number = stored.rpartition(":")
    return host.strip("[]"), int(number) if number.isdigit() else None


@lru_cache(maxsize=4096)  # bounded: an export of a year must not keep every round
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=4096)  # bounded: an export of a year must not keep every round
def report_id(vantage: str, round_id: str, round_start_ms: int, probe: Probe) -> str:
    """A round's report id in OONI's form (time, test, country, AS, a token), the same at every
    export: the token is a hash of the vantage point and the round id."""
    token = hashlib.sha256(f"{vantage}\0{round_id}".encode()).hexdigest()[:16]
    asn = probe.asn.removeprefix("AS") or "0"
    return f"{from_ms(round_start_ms):%Y%m%dT%H%M%SZ}_{TEST_NAME}_{probe.cc}_{asn}_n1_{token}"


class _Clock:
    """OONI's t0 and t (seconds from the measurement's start), phases laid end to end."""

    def __init__(self) -> None:
        self.at_s = 0.0

    def span(self, ms: float | None) -> dict[str, float]:
        """{"t0", "t"} of a phase that took `ms`; nothing for a phase not timed."""
        if ms is None:
            return {}
        t0 = self.at_s
        self.at_s += ms / 1000
        return {"t0": round(t0, 6), "t": round(self.at_s, 6)}


def _failure_at(row: dict[str, Any], operation: str) -> str | None:
    return row["failure"] if row["failed_operation"] == operation else None


def _queries(row: dict[str, Any], host: str, addresses: list[str], clock: _Clock) -> list[dict[str, Any]]:
    # A and AAAA are asked together on one socket and timed together (probe/measure/resolver.py).
    asked = row["resolve_ms"] is not None or row["failed_operation"] == RESOLVE or addresses
    if not asked or not host or _is_ip(host):
        return []
    times = clock.span(row["resolve_ms"])
    resolver = row["resolver"] or ""
    out = []
    for qtype, family in (("A", 4), ("AAAA", 6)):
        query: dict[str, Any] = {
            "answers": [
                {"answer_type": qtype, f"ipv{family}": a, "ttl": None}
                for a in addresses
                if (":" in a) == (family == 6)  # the store keeps addresses only
            ],
            "engine": "udp",  # our own resolver (DNS over UDP, TCP when truncated), not getaddrinfo
            "failure": _failure_at(row, RESOLVE),
            "hostname": host,
            "query_type": qtype,
            "resolver_address": "" if resolver == "system" else resolver,
            **times,
        }
        if row["dns_rcode"]:
            try:
                query["rcode"] = int(dns.rcode.from_text(row["dns_rcode"]))
            except dns.rcode.UnknownRcode:
                pass
        out.append(query)
    return out


def test_keys(row: dict[str, Any], addresses: list[str], verdict: dict[str, Any] | None) -> dict[str, Any]:
    kind = row["kind"]
    host, port = _host_port(kind, row["input"])
    clock = _Clock()
    queries = _queries(row, host, addresses, clock)
    clock.span(row["proxy_ms"])  # the path's own step: no OONI key; its time is in x_tunnelwatch
    ip = row["peer_address"] or (addresses[0] if addresses else host)
    tcp_connect: list[dict[str, Any]] = []
    tls_handshakes: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []
    if kind != "dns" and (row["connect_ms"] is not None or row["failed_operation"] == CONNECT):
        times = clock.span(row["connect_ms"])
        failure = _failure_at(row, CONNECT)
        tcp_connect.append(
            {"ip": ip, "port": port, "status": {"failure": failure, "success": failure is None}, **times}
        )
    tls = kind == "tls" or (kind == "http" and row["input"].startswith("https:"))
    if tls and (row["tls_ms"] is not None or row["failed_operation"] == TLS_HANDSHAKE or row["tls_version"]):
        times = clock.span(row["tls_ms"])
        tls_handshakes.append(
            {
                "network": "tcp",
                "address": f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}",
                "cipher_suite": "",
                "failure": _failure_at(row, TLS_HANDSHAKE),
                "negotiated_protocol": "",
                "no_tls_verify": False,
                "peer_certificates": [],  # not kept: subject, issuer and expiry are in x_tunnelwatch
                "server_name": host,
                **times,
                "tags": [],
                "tls_version": row["tls_version"] or "",
            }
        )
    if kind == "http":
        # The exchange runs from the end of the phases before it to the end of the whole fetch.
        times = {"t0": round(clock.at_s, 6), "t": round(row["total_ms"] / 1000, 6)} if row["total_ms"] else {}
        requests.append(
            {
                "failure": row["failure"] if row["failed_operation"] in EXCHANGE or not row["ok"] else None,
                "request": {
                    "body": "",
                    "body_is_truncated": False,
                    "headers": {},
                    "headers_list": [],
                    "method": "GET",
                    "tor": TOR_INFO,
                    "url": row["final_url"] or row["input"],  # the final one: redirects are not kept
                    "x_transport": "tcp",
                },
                "response": {
                    "body": None,  # not kept; its length and hash are
                    "body_is_truncated": False,
                    "code": row["status"] or 0,
                    "headers": {},
                    "headers_list": [],
                    "x_body_length": row["body_length"],
                    "x_body_sha256": row["body_sha256"],
                },
                **times,
            }
        )
    verdict_name = verdict["verdict"] if verdict else None
    blocking: str | bool | None = None
    if verdict_name == "blocked":
        blocking = verdict["blocking"] if verdict else None
    elif verdict_name in NOT_BLOCKED:
        blocking = False
    return {
        "agent": "redirect",
        "failed_operation": row["failed_operation"],
        "failure": row["failure"],
        "network_events": None,
        "queries": queries,
        "requests": requests,
        "socksproxy": None,
        "tcp_connect": tcp_connect,
        "tls_handshakes": tls_handshakes,
        "accessible": bool(row["ok"]) and verdict_name in (None, "ok"),
        "blocking": blocking,
        "x_verdict": verdict,
        "x_tunnelwatch": {c: row[c] for c in MEASUREMENT_COLUMNS},
    }


@lru_cache(maxsize=4096)  # bounded: an export of a year must not keep every round
def _utc(ms: int) -> str:
    return from_ms(ms).strftime(TIME_FORMAT)


def measurement(
    row: dict[str, Any],
    *,
    probe: Probe,
    path: PathInfo,
    round_start_ms: int,
    verdict: dict[str, Any] | None,
    software_version: str,
    addresses: list[str],
) -> dict[str, Any]:
    """The OONI measurement of one stored row (its columns as MEASUREMENT_COLUMNS name them,
    `addresses` parsed)."""
    phases = [row[f"{p}_ms"] for p in ("resolve", "proxy", "connect", "tls", "first_byte")]
    runtime_ms = row["total_ms"] if row["total_ms"] is not None else sum(p for p in phases if p is not None)
    return {
        "annotations": {
            "engine_name": SOFTWARE_NAME,
            "engine_version": software_version,
            "tunnelwatch_vantage": row["vantage"],
            "tunnelwatch_round_id": row["round_id"],
            "tunnelwatch_target": row["target"],
            "tunnelwatch_group": row["grp"],
            "tunnelwatch_path": row["path"],
            "tunnelwatch_path_kind": path.kind,
            "tunnelwatch_tunnel": path.label,
            "tunnelwatch_endpoint_target": path.endpoint_target,
        },
        "data_format_version": DATA_FORMAT_VERSION,
        "extensions": {"dnst": 0, "httpt": 0, "tcpconnect": 0, "tlshandshake": 0},
        "input": ooni_input(row["kind"], row["input"]),
        "measurement_start_time": _utc(row["started_at_ms"] - row["started_at_ms"] % 1000),
        "options": [],
        "probe_asn": probe.asn,
        "probe_cc": probe.cc,
        "probe_ip": "127.0.0.1",
        "probe_network_name": probe.network_name,
        "report_id": report_id(row["vantage"], row["round_id"], round_start_ms, probe),
        "software_name": SOFTWARE_NAME,
        "software_version": software_version,
        "test_helpers": {},
        "test_keys": test_keys(row, addresses, verdict),
        "test_name": TEST_NAME,
        "test_runtime": round(runtime_ms / 1000, 6),
        "test_start_time": _utc(round_start_ms - round_start_ms % 1000),
        "test_version": TEST_VERSION,
    }
