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

import numpy as np
import pandas as pd

from probe.model import PATH_OPERATIONS

OK, FAILING = "ok", "failing"
BLOCKED, TUNNEL_DOWN, LOCAL_OUTAGE, SITE_DOWN = "blocked", "tunnel_down", "local_outage", "site_down"
INCONCLUSIVE, UNKNOWN, DEGRADED = "inconclusive", "unknown", "degraded"
DIFF_FAILURES = frozenset({"http_status_error", "http_content_mismatch"})
DNS_ANSWERS_CONFLICT = "dns_answers_conflict"  # probe/measure/failures.py: two answers to one query disagreed
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
    same_failure: str | None = None  # the failure every working path of this round saw, if they all saw one
    round_paths: int = 1  # how many working paths (not broken themselves) measured this target this round
    all_controls_fail: bool = False  # in this slot every path failed every control target
    own_controls_fail: bool = False  # in this slot this path failed every control target
    paths_healthy: bool = False  # every path of this round worked for the control targets in this slot
    direct_controls_ok: bool = False  # in this slot a control target worked directly


def _same_failure_everywhere(e: Evidence) -> str | None:
    return e.same_failure if e.round_paths >= 2 else None


def _direct_blocked(e: Evidence) -> bool:
    return not e.tunnel and e.tunnel_ok


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    verdict: str
    description: str
    applies: Callable[[Evidence], bool]
    blocking: Callable[[Evidence], str | None] = lambda e: None


# Rule ids are stored: compaction writes them into `verdict_runs.rule` of every vantage
# point's store, and the forwarder copies them to the central one; outages list them. Renaming
# an id (or "ok", the id of a measurement no rule judged) is a data migration of those rows,
# not an edit here. A new rule takes a new id; a retired one still names old summaries' rows.
RULES: tuple[Rule, ...] = (
    Rule("local-outage", LOCAL_OUTAGE, "every path failed every control target in this slot",
         lambda e: e.all_controls_fail),
    Rule("tunnel-own-step", TUNNEL_DOWN, "the tunnel's own step failed: bind, proxy connect or proxy auth",
         lambda e: e.tunnel and e.failed_operation in PATH_OPERATIONS),
    Rule("tunnel-fails-controls", TUNNEL_DOWN, "the tunnel failed every control target while direct controls worked",
         lambda e: e.tunnel and e.own_controls_fail and e.direct_controls_ok),
    Rule("dns-answers-conflict", BLOCKED, "a query got two answers that disagree: an injector answered before the "
         "real server (no other path needed: the forgery is seen on this one)",
         lambda e: e.failure == DNS_ANSWERS_CONFLICT, lambda e: "dns"),
    Rule("bad-certificate-everywhere", SITE_DOWN, "every path saw the same certificate failure: the site's problem",
         lambda e: (_same_failure_everywhere(e) or "").startswith("ssl_")),
    Rule("same-failure-everywhere", SITE_DOWN, "every path failed the same way: the site is down, not blocked",
         lambda e: _same_failure_everywhere(e) is not None),
    Rule("fails-everywhere", SITE_DOWN, "every path failed, in different ways, while every path worked for the "
         "control targets: the site is down", lambda e: e.round_paths >= 2 and not e.ok and not e.other_ok
         and e.paths_healthy),
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


EPOCH = pd.Timestamp(0, tz="UTC")


def slot_of(times: pd.Series, slot_s: float) -> pd.Series:
    """The probing interval each time falls in, as an integer."""
    return ((times - EPOCH) // pd.Timedelta(seconds=slot_s)).astype("int64")


def path_kinds(paths: pd.DataFrame, names: pd.Series) -> dict[str, bool]:
    """path name -> goes through a tunnel. Paths the store does not describe: only the one
    named "direct" is taken as direct."""
    known = dict(zip(paths["name"], paths["kind"] != "direct", strict=True)) if len(paths) else {}
    return {name: known.get(name, name != "direct") for name in names.unique()}


EVIDENCE = (
    "tunnel",
    "ok",
    "failure",
    "failed_operation",
    "differs",
    "dns_inconsistent",
    "tunnel_ok",
    "other_ok",
    "same_failure",
    "round_paths",
    "all_controls_fail",
    "own_controls_fail",
    "direct_controls_ok",
    "paths_healthy",
)
ROUND = ["round_id", "target"]


def _floats(column: pd.Series) -> np.ndarray:
    return column.to_numpy(dtype=float, na_value=np.nan)


def _page_differs(m: pd.DataFrame) -> pd.Series:
    """Fine directly, but unlike the page the tunnel saw: status, title, or length ratio."""
    status, status_t = _floats(m["status"]), _floats(m["status_tunnel"])
    both = ~np.isnan(status) & ~np.isnan(status_t)
    titles = m["title"].notna() & m["title_tunnel"].notna() & (m["title"] != m["title_tunnel"])
    length, length_t = _floats(m["body_length"]), _floats(m["body_length_tunnel"])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.minimum(length, length_t) / np.maximum(length, length_t)
    return pd.Series(both & ((status != status_t) | titles.to_numpy() | (ratio < LENGTH_RATIO)), index=m.index)


def classify(measurements: pd.DataFrame, paths: pd.DataFrame, slot_s: float = 300) -> pd.DataFrame:
    """One verdict row per measurement (endpoint probes are evidence, not verdicts).

    Evidence is gathered with whole-column operations; the rule table is then consulted
    once per distinct evidence, not once per measurement."""
    m = measurements[measurements["group"] != "endpoint"].copy()
    tunnels = path_kinds(paths, m["path"])
    m["tunnel"] = m["path"].map(tunnels).astype(bool)
    m["slot"] = slot_of(m["started_at"], slot_s)
    columns = [
        "round_id",
        "target",
        "group",
        "path",
        "kind",
        "started_at",
        "slot",
        "ok",
        "failure",
        "failed_operation",
        "tunnel",
        "connect_ms",
        "first_byte_ms",
    ]
    if m.empty:
        return pd.DataFrame(columns=[*columns, "state", "verdict", "rule", "blocking", "detail"])

    reference = (
        m[m["tunnel"] & m["ok"]]
        .drop_duplicates(ROUND)[[*ROUND, "status", "title", "body_length", "addresses"]]
        .assign(tunnel_ok=True)
    )
    m = m.merge(reference, on=ROUND, how="left", suffixes=("", "_tunnel"))
    m["tunnel_ok"] = m["tunnel_ok"].astype("boolean").fillna(False).astype(bool)
    candidates = ~m["tunnel"] & m["tunnel_ok"]
    m["differs"] = candidates & m["ok"] & (m["kind"] == "http") & _page_differs(m)
    m["dns_inconsistent"] = False
    unlike = candidates & (m["addresses"] != m["addresses_tunnel"])
    if unlike.any():
        m.loc[unlike, "dns_inconsistent"] = [
            dns_inconsistent(_addresses(a), _addresses(b))
            for a, b in zip(m.loc[unlike, "addresses"], m.loc[unlike, "addresses_tunnel"], strict=True)
        ]
    out = m[columns].copy()
    out["state"], out["verdict"], out["rule"], out["blocking"], out["detail"] = OK, OK, "ok", None, ""
    suspicious = ~m["ok"] | m["differs"] | m["dns_inconsistent"]
    if suspicious.any():
        _round_and_slot_evidence(m)
        _decide_suspicious(m, out, suspicious, _endpoint_status(measurements, paths, slot_s))
    return out.sort_values(["started_at", "target", "path"]).reset_index(drop=True)


def _round_and_slot_evidence(m: pd.DataFrame) -> None:
    """What the other paths of the round, and the control targets of the slot, saw."""
    rounds = m.groupby(ROUND, sort=False)
    ok_in_round = rounds["ok"].transform("sum")
    m["other_ok"] = (ok_in_round - m["ok"].astype(int)) > 0
    controls = m[m["group"] == "control"]
    any_ok = controls.groupby("slot")["ok"].any()
    direct_ok = controls[~controls["tunnel"]].groupby("slot")["ok"].any()
    m["all_controls_fail"] = ~m["slot"].map(any_ok).astype("boolean").fillna(True).astype(bool)
    m["direct_controls_ok"] = m["slot"].map(direct_ok).astype("boolean").fillna(False).astype(bool)
    own = controls.groupby(["slot", "path"])["ok"].any().rename("own_ok").reset_index()
    m["own_controls_fail"] = (
        ~m[["slot", "path"]]
        .merge(own, on=["slot", "path"], how="left")["own_ok"]
        .astype("boolean")
        .fillna(True)
        .astype(bool)
        .to_numpy()
    )
    broken = m["own_controls_fail"] | m["failed_operation"].astype(object).isin(PATH_OPERATIONS)
    m["paths_healthy"] = ~broken.groupby([m["round_id"], m["target"]], sort=False, observed=True).transform("any")
    # "Every path failed the same way" is asked of the paths that work: a tunnel that is down
    # fails a site that is down in its own way, and must not hide that it is down for the rest.
    working = (
        m[~broken]
        .groupby(ROUND, sort=False, observed=True)
        .agg(paths=("path", "size"), ok=("ok", "sum"), kinds=("failure", "nunique"), first=("failure", "first"))
    )
    w = m[ROUND].merge(working, left_on=ROUND, right_index=True, how="left")
    m["round_paths"] = w["paths"].fillna(0).astype(int).to_numpy()
    same = w["first"].astype(object).where((w["ok"] == 0) & (w["kinds"] == 1))
    keep = ~broken.to_numpy() | (m["failure"].astype(object).to_numpy() == same.to_numpy())  # broken: if it agrees
    m["same_failure"] = same.where(keep, None).to_numpy()


def _none(value: object) -> object:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA else value


def _decide_suspicious(
    m: pd.DataFrame, out: pd.DataFrame, suspicious: pd.Series, endpoints: dict[tuple[int, str], str]
) -> None:
    rows = m.loc[suspicious]
    texts = ("failure", "failed_operation", "same_failure")
    columns = [[_none(v) for v in rows[c].astype(object)] if c in texts else rows[c].tolist() for c in EVIDENCE]
    keys = list(zip(*columns, strict=True))
    decided: dict[tuple[object, ...], tuple[str, str, str | None]] = {}
    for key in set(keys):
        fields = dict(zip(EVIDENCE, key, strict=True))
        fields = {k: (bool(v) if isinstance(v, (bool, np.bool_)) else v) for k, v in fields.items()}
        fields["round_paths"] = int(fields["round_paths"])
        decided[key] = decide(Evidence(**fields))
    verdicts = [decided[k] for k in keys]
    out.loc[rows.index, "state"] = FAILING
    out.loc[rows.index, "verdict"] = [v[0] for v in verdicts]
    out.loc[rows.index, "rule"] = [v[1] for v in verdicts]
    out.loc[rows.index, "blocking"] = [v[2] for v in verdicts]
    if endpoints:
        out.loc[rows.index, "detail"] = [
            endpoints.get((slot, path), "") if verdict[0] == TUNNEL_DOWN else ""
            for slot, path, verdict in zip(rows["slot"], rows["path"], verdicts, strict=True)
        ]


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
