"""Verdicts: why a measurement failed, decided by comparing the paths of the same round.

Facts first, then inference, in OONI's spirit: a tunnel that exits outside the censor plays
the role of OONI's control. Every failing (or suspicious) measurement gets the verdict of
the first rule in RULES that applies, and carries that rule's id.

A slot is one probing interval: control targets are probed in rounds of their own, so
"did the controls work at that time" is asked of the slot, not of the round.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from probe.model import PATH_OPERATIONS

OK, FAILING = "ok", "failing"
BLOCKED, TUNNEL_DOWN, LOCAL_OUTAGE, SITE_DOWN = "blocked", "tunnel_down", "local_outage", "site_down"
INCONCLUSIVE, UNKNOWN, DEGRADED = "inconclusive", "unknown", "degraded"
DIFF_FAILURES = frozenset({"http_status_error", "http_content_mismatch"})
LENGTH_RATIO = 0.7  # OONI's body length threshold for "the page differs"
TYPE_BY_OPERATION = {"resolve": "dns", "connect": "tcp_ip", "tls_handshake": "tls", "http_round_trip": "http-failure"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """What the verdict on one measurement is decided from."""

    tunnel: bool  # this measurement went through a tunnel
    ok: bool
    failure: str | None
    failed_operation: str | None
    differs: bool = False  # fine, but unlike the page a tunnel saw (status, title, length)
    dns_inconsistent: bool = False  # the names resolved here are not what the tunnel saw
    tunnel_ok: bool = False  # some tunnel reached this target in this round
    other_ok: bool = False  # some other path reached this target in this round
    round_failures: frozenset[str | None] = frozenset()  # every path's failure this round (None: ok)
    round_paths: int = 1  # how many paths measured this target this round
    all_controls_fail: bool = False  # in this slot every path failed every control target
    own_controls_fail: bool = False  # in this slot this path failed every control target
    direct_controls_ok: bool = False  # in this slot a control target worked directly


def _same_failure_everywhere(e: Evidence) -> str | None:
    if e.round_paths >= 2 and len(e.round_failures) == 1 and None not in e.round_failures:
        return next(iter(e.round_failures))
    return None


def _direct_blocked(e: Evidence) -> bool:
    return not e.tunnel and e.tunnel_ok


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    verdict: str
    description: str
    applies: Callable[[Evidence], bool]
    blocking: Callable[[Evidence], str | None] = lambda e: None


RULES: tuple[Rule, ...] = (
    Rule("local-outage", LOCAL_OUTAGE, "every path failed every control target in this slot",
         lambda e: e.all_controls_fail),
    Rule("tunnel-own-step", TUNNEL_DOWN, "the tunnel's own step failed: bind, proxy connect or proxy auth",
         lambda e: e.tunnel and e.failed_operation in PATH_OPERATIONS),
    Rule("tunnel-fails-controls", TUNNEL_DOWN, "the tunnel failed every control target while direct controls worked",
         lambda e: e.tunnel and e.own_controls_fail and e.direct_controls_ok),
    Rule("bad-certificate-everywhere", SITE_DOWN, "every path saw the same certificate failure: the site's problem",
         lambda e: (_same_failure_everywhere(e) or "").startswith("ssl_")),
    Rule("same-failure-everywhere", SITE_DOWN, "every path failed the same way: the site is down, not blocked",
         lambda e: _same_failure_everywhere(e) is not None),
    Rule("blocked-dns", BLOCKED, "direct resolution failed or disagrees with the tunnel's, which worked",
         lambda e: _direct_blocked(e) and (e.dns_inconsistent or e.failed_operation == "resolve"),
         lambda e: "dns"),
    Rule("blocked-tcp_ip", BLOCKED, "direct TCP connect failed while a tunnel reached the site",
         lambda e: _direct_blocked(e) and e.failed_operation == "connect", lambda e: "tcp_ip"),
    Rule("blocked-tls", BLOCKED, "the direct TLS handshake failed while a tunnel reached the site",
         lambda e: _direct_blocked(e) and e.failed_operation == "tls_handshake", lambda e: "tls"),
    Rule("blocked-http-failure", BLOCKED, "the direct HTTP exchange failed while a tunnel reached the site",
         lambda e: _direct_blocked(e) and e.failed_operation == "http_round_trip"
         and e.failure not in DIFF_FAILURES, lambda e: "http-failure"),
    Rule("blocked-http-diff", BLOCKED, "the page seen directly differs from the tunnel's (status, title, length)",
         lambda e: _direct_blocked(e) and (e.differs or e.failure in DIFF_FAILURES), lambda e: "http-diff"),
    Rule("blocked-behind-tunnel", BLOCKED, "this tunnel works for controls but not for this site, which another "
         "path reached", lambda e: e.tunnel and e.other_ok and not e.ok,
         lambda e: TYPE_BY_OPERATION.get(e.failed_operation or "")),
    Rule("inconclusive", INCONCLUSIVE, "failing, and no rule explains why (no path to compare with)",
         lambda e: not e.ok or e.differs or e.dns_inconsistent),
)  # fmt: skip


def decide(evidence: Evidence) -> tuple[str, str, str | None]:
    """(verdict, rule id, blocking type) for one measurement."""
    if evidence.ok and not evidence.differs and not evidence.dns_inconsistent:
        return OK, "ok", None
    for rule in RULES:
        if rule.applies(evidence):
            return rule.verdict, rule.id, rule.blocking(evidence)
    raise AssertionError("the last rule applies to every failing measurement")


def _addresses(text: object) -> frozenset[str]:
    if not isinstance(text, str) or text in ("", "[]"):
        return frozenset()
    return frozenset(json.loads(text))


def is_bogon(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not ip.is_global


def dns_inconsistent(direct: frozenset[str], tunnel: frozenset[str]) -> bool:
    """Direct answers share no address with the tunnel's, or are bogons where the tunnel's
    are not. Without the tunnel's answers there is no evidence either way."""
    if not direct or not tunnel:
        return False
    if direct.isdisjoint(tunnel):
        return True
    return all(map(is_bogon, direct)) and not all(map(is_bogon, tunnel))


def _differs(row: pd.Series) -> bool:
    if row["kind"] != "http" or pd.isna(row["status_tunnel"]) or pd.isna(row["status"]):
        return False
    if row["status"] != row["status_tunnel"]:
        return True
    if isinstance(row["title"], str) and isinstance(row["title_tunnel"], str) and row["title"] != row["title_tunnel"]:
        return True
    lengths = row["body_length"], row["body_length_tunnel"]
    if pd.isna(lengths[0]) or pd.isna(lengths[1]) or max(lengths) == 0:
        return False
    return min(lengths) / max(lengths) < LENGTH_RATIO


EPOCH = pd.Timestamp(0, tz="UTC")


def slot_of(times: pd.Series, slot_s: float) -> pd.Series:
    """The probing interval each time falls in, as an integer."""
    return ((times - EPOCH) // pd.Timedelta(seconds=slot_s)).astype("int64")


def path_kinds(paths: pd.DataFrame, names: pd.Series) -> dict[str, bool]:
    """path name -> goes through a tunnel. Paths the store does not describe: only the one
    named "direct" is taken as direct."""
    known = dict(zip(paths["name"], paths["kind"] != "direct", strict=True)) if len(paths) else {}
    return {name: known.get(name, name != "direct") for name in names.unique()}


def classify(measurements: pd.DataFrame, paths: pd.DataFrame, slot_s: float = 300) -> pd.DataFrame:
    """One verdict row per measurement (endpoint probes are evidence, not verdicts)."""
    m = measurements[measurements["group"] != "endpoint"].copy()
    tunnels = path_kinds(paths, m["path"])
    m["tunnel"] = m["path"].map(tunnels).astype(bool)
    m["slot"] = slot_of(m["started_at"], slot_s)
    columns = ["round_id", "target", "group", "path", "kind", "started_at", "slot", "ok", "failure",
               "failed_operation", "tunnel", "connect_ms", "first_byte_ms"]  # fmt: skip
    if m.empty:
        return pd.DataFrame(columns=[*columns, "state", "verdict", "rule", "blocking", "detail"])

    reference = (
        m[m["tunnel"] & m["ok"]]
        .drop_duplicates(["round_id", "target"])[["round_id", "target", "status", "title", "body_length", "addresses"]]
        .assign(tunnel_ok=True)
    )
    m = m.merge(reference, on=["round_id", "target"], how="left", suffixes=("", "_tunnel"))
    m["tunnel_ok"] = m["tunnel_ok"].astype("boolean").fillna(False).astype(bool)
    candidates = ~m["tunnel"] & m["tunnel_ok"]
    m["differs"] = False
    m["dns_inconsistent"] = False
    if candidates.any():
        sub = m[candidates]
        fine = candidates & m["ok"]
        if fine.any():
            m.loc[fine, "differs"] = m[fine].apply(_differs, axis=1).astype(bool)
        m.loc[candidates, "dns_inconsistent"] = [
            dns_inconsistent(_addresses(a), _addresses(b))
            for a, b in zip(sub["addresses"], sub["addresses_tunnel"], strict=True)
        ]
    suspicious = ~m["ok"] | m["differs"] | m["dns_inconsistent"]

    out = m[columns].copy()
    out["state"] = OK
    out["verdict"] = OK
    out["rule"] = "ok"
    out["blocking"] = None
    out["detail"] = ""
    if suspicious.any():
        _decide_suspicious(m, out, suspicious, measurements, paths, slot_s)
    return out.sort_values(["started_at", "target", "path"]).reset_index(drop=True)


def _decide_suspicious(
    m: pd.DataFrame,
    out: pd.DataFrame,
    suspicious: pd.Series,
    measurements: pd.DataFrame,
    paths: pd.DataFrame,
    slot_s: float,
) -> None:
    controls = m[m["group"] == "control"]
    by_slot_path = controls.groupby(["slot", "path"])["ok"].any()
    any_ok_by_slot = controls.groupby("slot")["ok"].any()
    direct_ok_by_slot = controls[~controls["tunnel"]].groupby("slot")["ok"].any()
    rounds = m[m["round_id"].isin(m.loc[suspicious, "round_id"])]
    round_failures = rounds.groupby(["round_id", "target"])["failure"].agg(
        lambda s: frozenset(None if pd.isna(f) else f for f in s)
    )
    round_ok_paths = rounds[rounds["ok"]].groupby(["round_id", "target"])["path"].agg(frozenset)
    round_paths = rounds.groupby(["round_id", "target"])["path"].nunique()
    endpoints = _endpoint_status(measurements, paths, slot_s)

    any_ok = any_ok_by_slot.to_dict()
    path_ok = by_slot_path.to_dict()
    direct_ok = direct_ok_by_slot.to_dict()
    failures, ok_paths_by_round, paths_by_round = round_failures.to_dict(), round_ok_paths.to_dict(), round_paths.to_dict()
    decided: dict[str, list] = {"state": [], "verdict": [], "rule": [], "blocking": [], "detail": []}
    rows = m.loc[suspicious]
    for row in rows.itertuples(index=False):
        key = (row.round_id, row.target)
        evidence = Evidence(
            tunnel=bool(row.tunnel),
            ok=bool(row.ok),
            failure=None if pd.isna(row.failure) else row.failure,
            failed_operation=None if pd.isna(row.failed_operation) else row.failed_operation,
            differs=bool(row.differs),
            dns_inconsistent=bool(row.dns_inconsistent),
            tunnel_ok=bool(row.tunnel_ok),
            other_ok=bool(ok_paths_by_round.get(key, frozenset()) - {row.path}),
            round_failures=failures.get(key, frozenset()),
            round_paths=int(paths_by_round.get(key, 1)),
            all_controls_fail=not any_ok.get(row.slot, True),
            own_controls_fail=not path_ok.get((row.slot, row.path), True),
            direct_controls_ok=bool(direct_ok.get(row.slot, False)),
        )
        verdict, rule, blocking = decide(evidence)
        decided["state"].append(FAILING)
        decided["verdict"].append(verdict)
        decided["rule"].append(rule)
        decided["blocking"].append(blocking)
        decided["detail"].append(endpoints.get((row.slot, row.path), "") if verdict == TUNNEL_DOWN else "")
    for column, values in decided.items():
        out.loc[rows.index, column] = values


def _endpoint_status(measurements: pd.DataFrame, paths: pd.DataFrame, slot_s: float) -> dict[tuple[int, str], str]:
    """(slot, path) -> what the direct probe of the tunnel server's port saw."""
    if not len(paths) or paths["endpoint_target"].isna().all():
        return {}
    owner = dict(zip(paths["endpoint_target"], paths["name"], strict=True))
    probes = measurements[measurements["group"] == "endpoint"]
    status = {}
    for _, row in probes.iterrows():
        path = owner.get(row["target"])
        if path:
            slot = int(row["started_at"].timestamp() // slot_s)
            status[(slot, path)] = "endpoint reachable" if row["ok"] else f"endpoint {row['failure']}"
    return status
