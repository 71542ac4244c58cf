"""Verdict rules: one test per rule, then censorship scenarios through a real store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from analysis.frames import load_measurements, load_paths
from analysis.verdicts import RULES, Evidence, classify, decide, dns_inconsistent
from tests.analysis_data import OK, build_store, everything, fail

# One evidence per rule, built so that this rule is the first that applies.
RULE_EVIDENCE: dict[str, Evidence] = {
    "local-outage": Evidence(tunnel=False, ok=False, failure="network_unreachable", failed_operation="connect",
                             all_controls_fail=True),
    "tunnel-own-step": Evidence(tunnel=True, ok=False, failure="connection_refused", failed_operation="proxy_connect"),
    "tunnel-fails-controls": Evidence(tunnel=True, ok=False, failure="eof_error", failed_operation="http_round_trip",
                                      own_controls_fail=True, direct_controls_ok=True),
    "dns-answers-conflict": Evidence(tunnel=False, ok=False, failure="dns_answers_conflict", failed_operation="resolve",
                                     same_failure="dns_answers_conflict", round_paths=2),
    "bad-certificate-everywhere": Evidence(tunnel=False, ok=False, failure="ssl_invalid_certificate",
                                           failed_operation="tls_handshake",
                                           same_failure="ssl_invalid_certificate", round_paths=3),
    "same-failure-everywhere": Evidence(tunnel=False, ok=False, failure="connection_refused",
                                        failed_operation="connect", same_failure="connection_refused",
                                        round_paths=2),
    "fails-everywhere": Evidence(tunnel=True, ok=False, failure="eof_error", failed_operation="tls_handshake",
                                 round_paths=3, paths_healthy=True),
    "blocked-dns": Evidence(tunnel=False, ok=False, failure="dns_nxdomain_error", failed_operation="resolve",
                            tunnel_ok=True, other_ok=True),
    "blocked-tcp_ip": Evidence(tunnel=False, ok=False, failure="generic_timeout_error", failed_operation="connect",
                               tunnel_ok=True, other_ok=True),
    "blocked-tls": Evidence(tunnel=False, ok=False, failure="connection_reset", failed_operation="tls_handshake",
                            tunnel_ok=True, other_ok=True),
    "blocked-http-failure": Evidence(tunnel=False, ok=False, failure="eof_error", failed_operation="http_round_trip",
                                     tunnel_ok=True, other_ok=True),
    "blocked-http-diff": Evidence(tunnel=False, ok=True, failure=None, failed_operation=None, differs=True,
                                  tunnel_ok=True, other_ok=True),
    "blocked-behind-tunnel": Evidence(tunnel=True, ok=False, failure="connection_reset",
                                      failed_operation="tls_handshake", other_ok=True),
    "inconclusive": Evidence(tunnel=False, ok=False, failure="generic_timeout_error", failed_operation="connect"),
}  # fmt: skip


def test_every_rule_has_a_test() -> None:
    assert [rule.id for rule in RULES] == list(RULE_EVIDENCE)


@pytest.mark.parametrize("rule", RULES, ids=[r.id for r in RULES])
def test_rule(rule: Any) -> None:
    verdict, rule_id, _ = decide(RULE_EVIDENCE[rule.id])
    assert (verdict, rule_id) == (rule.verdict, rule.id)


def test_a_working_measurement_is_ok() -> None:
    assert decide(Evidence(tunnel=False, ok=True, failure=None, failed_operation=None)) == ("ok", "ok", None)


def test_bogon_answers_alone_are_not_proof() -> None:
    assert not dns_inconsistent(frozenset({"10.0.0.1"}), frozenset())
    assert dns_inconsistent(frozenset({"10.0.0.1"}), frozenset({"93.184.216.34"}))
    assert dns_inconsistent(frozenset({"10.0.0.1"}), frozenset({"10.0.0.2"}))  # disjoint
    assert not dns_inconsistent(frozenset({"93.184.216.34"}), frozenset({"93.184.216.34", "1.1.1.1"}))


def verdicts(tmp_path: Path, outcomes: dict[tuple[str, str], dict[str, Any]]) -> pd.DataFrame:
    db = tmp_path / "tw.db"
    build_store(db, [(0, everything(outcomes))])
    return classify(load_measurements(db), load_paths(db)).set_index(["target", "path"])


SINKHOLE = ("10.10.34.35",)
SCENARIOS = [
    # (name, injected outcomes, (target, path) to look at, verdict, rule, blocking)
    ("dns poisoned to a sinkhole", {("news", "direct"): fail("generic_timeout_error", "connect", addresses=SINKHOLE)},
     ("news", "direct"), "blocked", "blocked-dns", "dns"),
    ("injected NXDOMAIN", {("news", "direct"): fail("dns_nxdomain_error", "resolve")},
     ("news", "direct"), "blocked", "blocked-dns", "dns"),
    ("a forged DNS answer before the real one",
     {("news", "direct"): fail("dns_answers_conflict", "resolve", addresses=(*SINKHOLE, *OK["addresses"]))},
     ("news", "direct"), "blocked", "dns-answers-conflict", "dns"),
    ("forged DNS answers on every path", {("news", p): fail("dns_answers_conflict", "resolve")
                                          for p in ("direct", "vpn", "wg")},
     ("news", "wg"), "blocked", "dns-answers-conflict", "dns"),
    ("reset on the TLS SNI", {("news", "direct"): fail("connection_reset", "tls_handshake")},
     ("news", "direct"), "blocked", "blocked-tls", "tls"),
    ("SYN blackhole", {("news", "direct"): fail("generic_timeout_error", "connect", addresses=OK["addresses"])},
     ("news", "direct"), "blocked", "blocked-tcp_ip", "tcp_ip"),
    ("refused", {("news", "direct"): fail("connection_refused", "connect")},
     ("news", "direct"), "blocked", "blocked-tcp_ip", "tcp_ip"),
    ("EOF after the request", {("news", "direct"): fail("eof_error", "http_round_trip")},
     ("news", "direct"), "blocked", "blocked-http-failure", "http-failure"),
    ("block page", {("news", "direct"): dict(OK, title="Access denied", body_length=312)},
     ("news", "direct"), "blocked", "blocked-http-diff", "http-diff"),
    ("bad certificate on the site itself",
     {("news", p): fail("ssl_invalid_certificate", "tls_handshake") for p in ("direct", "vpn", "wg")},
     ("news", "vpn"), "site_down", "bad-certificate-everywhere", None),
    ("site down everywhere", {("news", p): fail("connection_refused", "connect") for p in ("direct", "vpn", "wg")},
     ("news", "direct"), "site_down", "same-failure-everywhere", None),
    ("bad certificate on the site while a tunnel's exit is broken",
     {**{(t, "vpn"): fail("eof_error", "tls_handshake") for t in ("news", "search", "portal", "shop")},
      **{("news", p): fail("ssl_invalid_certificate", "tls_handshake") for p in ("direct", "wg")}},
     ("news", "direct"), "site_down", "bad-certificate-everywhere", None),
    ("tunnel port blocked",
     {**{(t, "vpn"): fail("eof_error", "http_round_trip") for t in ("news", "search", "portal", "shop")},
      ("vpn-endpoint", "direct"): fail("generic_timeout_error", "connect")},
     ("portal", "vpn"), "tunnel_down", "tunnel-fails-controls", None),
    ("proxy down", {("news", "vpn"): fail("connection_refused", "proxy_connect")},
     ("news", "vpn"), "tunnel_down", "tunnel-own-step", None),
    ("uplink down", {(t, p): fail("network_unreachable", "connect")
                     for t in ("news", "search", "portal", "shop") for p in ("direct", "vpn", "wg")},
     ("shop", "wg"), "local_outage", "local-outage", None),
    ("blocked at one tunnel's exit too",
     {("news", "direct"): fail("connection_reset", "tls_handshake"), ("news", "wg"): fail("connection_reset",
                                                                                         "tls_handshake")},
     ("news", "wg"), "blocked", "blocked-behind-tunnel", "tls"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "outcomes", "key", "verdict", "rule", "blocking"), SCENARIOS, ids=[s[0] for s in SCENARIOS]
)
def test_scenario(
    tmp_path: Path, name: str, outcomes: dict, key: tuple[str, str], verdict: str, rule: str, blocking: str | None
) -> None:
    frame = verdicts(tmp_path, outcomes)
    row = frame.loc[key]
    assert (row["verdict"], row["rule"], row["blocking"]) == (verdict, rule, blocking)
    assert row["state"] == "failing"
    untouched = [
        k for k in frame.index if k not in outcomes and k[0] in ("search", "shop") and verdict != "local_outage"
    ]
    assert all(frame.loc[k, "verdict"] == "ok" for k in untouched if k[1] != "vpn" or verdict != "tunnel_down")


def test_tunnel_down_says_whether_the_server_port_answers(tmp_path: Path) -> None:
    outcomes = {(t, "vpn"): fail("eof_error", "http_round_trip") for t in ("news", "search", "portal", "shop")}
    blocked_port = verdicts(tmp_path, {**outcomes, ("vpn-endpoint", "direct"): fail("connection_refused", "connect")})
    assert blocked_port.loc[("news", "vpn"), "detail"] == "endpoint connection_refused"
    (tmp_path / "other").mkdir()
    broken_tunnel = verdicts(tmp_path / "other", outcomes)
    assert broken_tunnel.loc[("news", "vpn"), "detail"] == "endpoint reachable"


def test_endpoint_probes_are_evidence_not_verdicts(tmp_path: Path) -> None:
    frame = verdicts(tmp_path, {})
    assert "vpn-endpoint" not in {t for t, _ in frame.index}
    assert set(frame["verdict"]) == {"ok"}


def test_without_a_tunnel_a_failure_is_inconclusive(tmp_path: Path) -> None:
    db = tmp_path / "tw.db"
    build_store(db, [(0, {"news": {"direct": fail("connection_reset", "tls_handshake")}, "portal": {"direct": OK}})])
    frame = classify(load_measurements(db), load_paths(db)).set_index(["target", "path"])
    assert (frame.loc[("news", "direct"), "verdict"], frame.loc[("news", "direct"), "rule"]) == (
        "inconclusive",
        "inconclusive",
    )
