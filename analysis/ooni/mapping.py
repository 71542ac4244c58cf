"""OONI measurements as tunnelwatch rows: which vantage point, target, path and round each
is, the failure as OONI wrote it, the facts OONI's observation keys hold, and OONI's own
verdict kept in `detail`. Pure: no I/O.

| OONI experiment | path | target | rows |
|---|---|---|---|
| web_connectivity | `direct` | the input URL | one |
| vanilla_tor / torsf | `tor` / `tor-snowflake` | the test name (the bootstrap) | one |
| tor | `tor` | each of `test_keys.targets` (its name, else its id) | one a target |
| openvpn / riseupvpn / psiphon | `openvpn` / `riseupvpn` / `psiphon` | the input, else the test name | one |

A measurement of tunnelwatch's own export (`software_name` "tunnelwatch") is read back from
its `x_tunnelwatch` row exactly.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from probe.model import CONNECT, HTTP_ROUND_TRIP, RESOLVE, TLS_HANDSHAKE, TUNNEL_BOOTSTRAP
from probe.store.schema import MEASUREMENT_COLUMNS, to_ms

from .record import SOFTWARE_NAME, TIME_FORMAT

# test name -> (path, the tunnel's kind): the path each experiment's measurements are stored under.
PATHS = {
    "web_connectivity": ("direct", ""),
    "vanilla_tor": ("tor", "tor"),
    "tor": ("tor", "tor"),
    "torsf": ("tor-snowflake", "snowflake"),
    "openvpn": ("openvpn", "openvpn"),
    "riseupvpn": ("riseupvpn", "openvpn"),
    "psiphon": ("psiphon", "psiphon"),
}
TOR_KINDS = {"dir_port": "http", "or_port": "tls", "or_port_dirauth": "tls", "obfs4": "tcp"}
# OONI's verdict and summary keys, kept as OONI wrote them (in `detail`).
VERDICT_KEYS = {
    "web_connectivity": ("blocking", "accessible", "dns_consistency", "control_failure", "dns_experiment_failure",
                         "http_experiment_failure", "status_code_match", "body_length_match", "headers_match",
                         "title_match"),
    "vanilla_tor": ("success", "error", "bootstrap_time", "tor_progress", "tor_progress_tag", "tor_progress_summary",
                    "transport_name"),
    "torsf": ("success", "error", "bootstrap_time", "tor_progress", "tor_progress_tag", "tor_progress_summary",
              "transport_name", "rendezvous_method"),
    "tor": ("dir_port_total", "dir_port_accessible", "obfs4_total", "obfs4_accessible", "or_port_dirauth_total",
            "or_port_dirauth_accessible", "or_port_total", "or_port_accessible"),
    "openvpn": ("success", "success_handshake", "success_icmp", "success_urlgrab", "bootstrap_time", "provider",
                "obfuscation", "transport", "remote"),
    "riseupvpn": ("api_status", "api_failure", "api_failures", "ca_cert_status", "failing_gateways",
                  "transport_status"),
    "psiphon": ("bootstrap_time", "max_runtime"),
}  # fmt: skip
REQUIRED = ("test_name", "measurement_start_time", "probe_cc", "probe_asn", "test_keys")


class Malformed(ValueError):
    """Not a measurement this reads: says what is wrong."""


class Unknown(ValueError):
    """A measurement of a test this does not read; `args[0]` is its name."""


@dataclass(frozen=True, slots=True)
class Imported:
    """One OONI measurement as rows (MEASUREMENT_COLUMNS each) and the round they are."""

    vantage: str
    round_id: str
    started_at_ms: int
    finished_at_ms: int
    rows: tuple[dict[str, Any], ...]
    paths: tuple[tuple[str, str, str, str | None], ...]  # (name, kind, label, endpoint target)


def vantage_of(cc: str, asn: str) -> str:
    return f"ooni-{cc}-{asn}".lower()


def started_ms(text: Any) -> int:
    try:
        return to_ms(datetime.strptime(str(text), TIME_FORMAT).replace(tzinfo=UTC))
    except ValueError:
        raise Malformed(f"measurement_start_time {text!r} is not OONI's YYYY-MM-DD HH:MM:SS") from None


def round_of(m: dict[str, Any]) -> str:
    """The key a measurement is stored once by: its measurement_uid, else its report_id and
    input, else (a report id left empty, as miniooni leaves it) a hash of the whole measurement."""
    if m.get("measurement_uid"):
        return f"ooni:{m['measurement_uid']}"
    if m.get("report_id"):
        given = m.get("input")
        text = given if isinstance(given, str) else json.dumps(given)
        return f"ooni:{m['report_id']}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    whole = json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
    return f"ooni:sha256:{hashlib.sha256(whole).hexdigest()[:32]}"


def _list(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return [value]  # openvpn's tcp_connect is one object
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _ms(event: dict[str, Any]) -> float | None:
    t0, t = event.get("t0"), event.get("t")
    if isinstance(t0, (int, float)) and isinstance(t, (int, float)) and t >= t0:
        return round((t - t0) * 1000, 3)
    return None


def _status_failure(connect: dict[str, Any]) -> str | None:
    status = connect.get("status")
    failure = status.get("failure") if isinstance(status, dict) else None
    return failure if isinstance(failure, str) else None


def _body(response: dict[str, Any]) -> bytes | None:
    body = response.get("body")
    if response.get("body_is_truncated") or body is None:
        return None
    if isinstance(body, dict) and body.get("format") == "base64":
        try:
            return base64.b64decode(str(body.get("data", "")))
        except ValueError:
            return None
    return body.encode() if isinstance(body, str) else None


def _certificate(handshake: dict[str, Any]) -> dict[str, Any]:
    certificates = _list(handshake.get("peer_certificates"))
    if not certificates or certificates[0].get("format") != "base64":
        return {}
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(str(certificates[0].get("data", ""))))
        return {
            "cert_subject": cert.subject.rfc4514_string(),
            "cert_issuer": cert.issuer.rfc4514_string(),
            "cert_not_after_ms": to_ms(cert.not_valid_after_utc),
        }
    except ValueError:
        return {}


def observations(keys: dict[str, Any]) -> dict[str, Any]:
    """The facts of OONI's dnst, tcpconnect, tlshandshake and httpt keys, as row columns, and
    the first operation that failed there (`_failed`: (failure, operation) or None)."""
    out: dict[str, Any] = {}
    queries, connects = _list(keys.get("queries")), _list(keys.get("tcp_connect"))
    handshakes, requests = _list(keys.get("tls_handshakes")), _list(keys.get("requests"))
    addresses = []
    for query in queries:
        for answer in _list(query.get("answers")):
            for family in ("ipv4", "ipv6"):
                if isinstance(answer.get(family), str) and answer[family] not in addresses:
                    addresses.append(answer[family])
    out["addresses"] = json.dumps(addresses[:32])
    if queries:
        out["resolve_ms"] = _ms(queries[0])
        if isinstance(queries[0].get("resolver_address"), str) and queries[0]["resolver_address"]:
            out["resolver"] = queries[0]["resolver_address"]
    good = [c for c in connects if _status_failure(c) is None and isinstance(c.get("ip"), str)]
    if good:
        out["peer_address"] = good[0]["ip"]
    if connects:
        out["connect_ms"] = _ms((good or connects)[0])
    if handshakes:
        handshake = next((h for h in handshakes if h.get("failure") is None), handshakes[0])
        out["tls_ms"] = _ms(handshake)
        out["tls_version"] = handshake.get("tls_version") or None
        out["tls_verified"] = None if handshake.get("no_tls_verify") else handshake.get("failure") is None
        out.update(_certificate(handshake))
    if requests:  # the final response first (httpt: requests in time-reverse order)
        request, response = requests[0].get("request") or {}, requests[0].get("response") or {}
        code = response.get("code") if isinstance(response, dict) else None
        out["status"] = code if isinstance(code, int) and code > 0 else None
        out["final_url"] = request.get("url") if isinstance(request, dict) else None
        body = _body(response) if isinstance(response, dict) else None
        if body is not None and out["status"] is not None:
            out["body_length"], out["body_sha256"] = len(body), hashlib.sha256(body).hexdigest()
    failed = None
    if any(q.get("failure") for q in queries) and not addresses:
        failed = (next(q["failure"] for q in queries if q.get("failure")), RESOLVE)
    elif connects and not good:
        failed = (_status_failure(connects[0]), CONNECT)
    elif handshakes and all(h.get("failure") for h in handshakes):
        failed = (handshakes[0]["failure"], TLS_HANDSHAKE)
    elif requests and requests[0].get("failure"):
        failed = (requests[0]["failure"], HTTP_ROUND_TRIP)
    out["_failed"] = failed
    return out


def _row(base: dict[str, Any], **columns: Any) -> dict[str, Any]:
    row = {c: None for c in MEASUREMENT_COLUMNS} | base | columns
    row["addresses"] = row["addresses"] or "[]"
    row["ok"] = int(bool(row["ok"]))
    return row


def _verdict(test: str, keys: dict[str, Any]) -> dict[str, Any]:
    return {k: keys[k] for k in VERDICT_KEYS.get(test, ()) if k in keys}


def _bootstrap(keys: dict[str, Any]) -> tuple[str | None, str | None, float | None]:
    """(failure, failed operation, bootstrap ms) of a tunnel experiment (df-009-tunnel)."""
    failure = keys.get("failure") if isinstance(keys.get("failure"), str) else None
    seconds = keys.get("bootstrap_time")
    if isinstance(seconds, (int, float)) and seconds > 0:
        return failure, None, round(seconds * 1000, 3)
    return failure, TUNNEL_BOOTSTRAP if failure else None, None


def from_ooni(m: Any) -> Imported:
    """The rows of one OONI measurement. Malformed or Unknown when it cannot be read."""
    if not isinstance(m, dict):
        raise Malformed(f"a JSON {type(m).__name__}, not a measurement object")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise Malformed(f"not an OONI measurement: no {', '.join(missing)}")
    keys = m["test_keys"]
    if not isinstance(keys, dict):
        raise Malformed("test_keys is not an object")
    at = started_ms(m["measurement_start_time"])
    if m.get("software_name") == SOFTWARE_NAME and isinstance(keys.get("x_tunnelwatch"), dict):
        return _ours(m, keys["x_tunnelwatch"], at)
    test = str(m["test_name"])
    if test not in PATHS:
        raise Unknown(test)
    cc, asn = str(m["probe_cc"] or "ZZ"), str(m["probe_asn"] or "AS0")
    vantage, round_id = vantage_of(cc, asn), round_of(m)
    path, tunnel = PATHS[test]
    runtime = m.get("test_runtime")
    total = round(runtime * 1000, 3) if isinstance(runtime, (int, float)) and runtime >= 0 else None
    source = {
        k: m[k]
        for k in ("test_name", "test_version", "software_name", "software_version", "report_id", "measurement_uid")
        if m.get(k)
    }
    given = m.get("input") if isinstance(m.get("input"), str) and m.get("input") else None
    base = {"vantage": vantage, "round_id": round_id, "path": path, "started_at_ms": at, "total_ms": total}
    base["resolver"] = keys.get("client_resolver") or m.get("resolver_ip") or None
    if test == "tor":
        rows = _tor(keys, base, source, given)
    else:
        facts = observations(keys)
        failed = facts.pop("_failed")
        verdict = _verdict(test, keys)
        if test == "web_connectivity":
            failure, operation, ok = _web(keys, failed)
            kind, group = "http", test
        else:
            failure, operation, bootstrap_ms = _bootstrap(keys)
            if failure is None and isinstance(keys.get("api_failure"), str):
                failure = keys["api_failure"]
            if failure is None and isinstance(keys.get("api_failures"), list) and keys["api_failures"]:
                failure = str(keys["api_failures"][0])
            if failed is not None and (failure is None or operation is None):
                failure, operation = failure or failed[0], failed[1]
            if isinstance(keys.get("failed_operation"), str):
                operation = keys["failed_operation"]
            facts["proxy_ms"] = bootstrap_ms
            ok = keys["success"] if isinstance(keys.get("success"), bool) else failure is None
            ok = ok and keys.get("api_status") != "blocked" and not keys.get("failing_gateways")
            kind, group = "tunnel", test
        detail = json.dumps({"ooni": source | {"input": m.get("input")} | verdict}, sort_keys=True)
        rows = [
            _row(
                base | facts,
                target=given or test,
                grp=group,
                kind=kind,
                input=given or "",
                ok=ok,
                failure=failure,
                failed_operation=operation if failure is not None or not ok else None,
                detail=detail,
            )
        ]
    paths = ((path, "direct" if path == "direct" else "ooni", tunnel, None),)
    finished = at + round(total or 0)
    return Imported(vantage, round_id, at, finished, tuple(rows), paths)


def _web(keys: dict[str, Any], failed: tuple[Any, str] | None) -> tuple[str | None, str | None, bool]:
    """web_connectivity's failure, the operation it failed in and whether the page came."""
    if isinstance(keys.get("dns_experiment_failure"), str):
        failure, operation = keys["dns_experiment_failure"], RESOLVE
    elif isinstance(keys.get("http_experiment_failure"), str):
        failure = keys["http_experiment_failure"]
        operation = failed[1] if failed is not None and failed[1] != RESOLVE else HTTP_ROUND_TRIP
    else:
        failure, operation = None, None
    accessible = keys.get("accessible")
    return failure, operation, accessible if isinstance(accessible, bool) else failure is None


def _tor(keys: dict[str, Any], base: dict[str, Any], source: dict[str, Any], given: str | None) -> list[dict[str, Any]]:
    """The tor experiment: a row for each of its targets (relays, directory ports, bridges)."""
    targets = keys.get("targets")
    if not isinstance(targets, dict) or not targets:
        raise Malformed("a tor measurement without test_keys.targets")
    summary = _verdict("tor", keys)
    rows = []
    for ident, target in sorted(targets.items()):
        if not isinstance(target, dict):
            raise Malformed(f"tor target {ident!r} is not an object")
        facts = observations(target)
        failed = facts.pop("_failed")
        failure = target.get("failure") if isinstance(target.get("failure"), str) else None
        operation = (failed[1] if failed else None) if failure else None
        protocol = str(target.get("target_protocol") or "")
        kept = {k: target[k] for k in ("target_protocol", "target_source", "summary") if k in target}
        rows.append(
            _row(
                base | facts,
                target=str(target.get("target_name") or ident),
                grp="tor",
                kind=TOR_KINDS.get(protocol, "tunnel"),
                input=str(target.get("target_address") or given or ""),
                ok=failure is None,
                failure=failure,
                failed_operation=operation,
                detail=json.dumps({"ooni": source | {"target": ident} | kept | summary}, sort_keys=True),
            )
        )
    return rows


def _ours(m: dict[str, Any], stored: dict[str, Any], at: int) -> Imported:
    """A measurement tunnelwatch exported: its row as it was stored."""
    missing = [c for c in MEASUREMENT_COLUMNS if c not in stored]
    if missing:
        raise Malformed(f"x_tunnelwatch lacks {', '.join(missing)}")
    row = {c: stored[c] for c in MEASUREMENT_COLUMNS}
    if not isinstance(row["started_at_ms"], int) or abs(row["started_at_ms"] - at) >= 1000:
        raise Malformed("x_tunnelwatch.started_at_ms is not the measurement_start_time")
    given = m.get("annotations")
    notes: dict[str, Any] = given if isinstance(given, dict) else {}
    path = (row["path"], str(notes.get("tunnelwatch_path_kind") or "") or ("direct" if row["path"] == "direct" else "ooni"),
            str(notes.get("tunnelwatch_tunnel") or ""), str(notes.get("tunnelwatch_endpoint_target") or "") or None)  # fmt: skip
    total = row["total_ms"] if isinstance(row["total_ms"], (int, float)) else 0
    return Imported(str(row["vantage"]), str(row["round_id"]), at, at + round(total), (row,), (path,))
