"""The censor's harder tricks, injected for real in the lab (issue 19), each with the verdict
tunnelwatch must give: DNS injection racing the real resolver, a share of connections
dropped, a tunnel throttled rather than blocked, a tunnel whose exit is broken, and blocking
that outlives a stopped daemon; then a timeline of them under the daemon.

The lab's config gets, here: `open-dns`, a direct path asking the resolver across the router
(a user who set a foreign resolver: the only queries an injector on the border sees), a dns
target for a name only it asks (`www.news.test`: the connection probes keep their verdicts),
and `ss-exit`, a second Shadowsocks tunnel whose server runs as `nobody`, so its outgoing
connections can be cut inside the "internet" by owner. The WireGuard path is left out: its
wireguard-go control sockets are shared between namespaces, so it is no evidence while
another lab runs.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import dns.name
import pandas as pd
import pytest

from analysis.frames import load_measurements, load_paths
from analysis.verdicts import classify
from tests.lab.kit import RESET, assert_only_path_slowed, isp_resolver, probe_round, rule, running, spawn
from tests.lab.network import NET, NEWS, RESOLVER, RT, SHADOWSOCKS, VP, in_ns, sh
from tests.servers import need, stop

SS_EXIT = "10.66.2.24"  # the second Shadowsocks server's address in the "internet"
SS_EXIT_LOCAL = 1082  # its ss-local's SOCKS port in the vantage point
CIPHER = ["-k", "lab-ss-key", "-m", "chacha20-ietf-poly1305"]
INJECTED = "www.news.test"  # the clean resolver answers it with news.test's address (a subdomain)
FORGED = "10.66.2.99"
INJECTOR = Path(__file__).with_name("injector.py")
EXTRA = f"""
[[paths]]
name = "open-dns"
kind = "direct"
resolver = ["{RESOLVER}"]
[[paths]]
name = "ss-exit"
kind = "socks5"
label = "shadowsocks"
host = "127.0.0.1"
port = {SS_EXIT_LOCAL}
remote_dns = false
resolver = ["{RESOLVER}"]
endpoint = {{ host = "{SS_EXIT}", port = 8388, transport = "tcp" }}
[[targets]]
name = "news-dns"
group = "blocked"
kind = "dns"
host = "{INJECTED}"
"""


@pytest.fixture(scope="module")
def tricks(lab: Path) -> Iterator[Path]:
    """The lab's config with the paths and target above (same store), ss-exit running."""
    tmp = lab.parent
    in_ns(NET, "ip", "addr", "add", f"{SS_EXIT}/32", "dev", "lo")
    ss_server = [need("ss-server"), "-s", SS_EXIT, "-p", "8388", "-a", "nobody", *CIPHER]
    ss_local = [need("ss-local"), "-s", SS_EXIT, "-p", "8388", "-b", "127.0.0.1", "-l", str(SS_EXIT_LOCAL), *CIPHER]
    with (
        running(NET, ss_server, tmp / "ss-exit-server.log", SS_EXIT, 8388),
        running(VP, ss_local, tmp / "ss-exit-local.log", "127.0.0.1", SS_EXIT_LOCAL),
    ):
        config = tmp / "tricks.toml"
        text = lab.read_text().replace("[probe]", "[probe]\ndns_linger_s = 0.5")
        config.write_text(text + EXTRA)
        yield config


def variant(config: Path, name: str, probe: str = "", extra: str = "", timeout_s: float = 3) -> Path:
    """The config with its own store, more [probe] settings and more tables."""
    out = config.with_name(f"{name}.toml")
    text = config.read_text().replace(str(config.parent / "store.db"), str(config.parent / f"{name}.db"))
    text = text.replace("timeout_s = 3\n", f"timeout_s = {timeout_s}\n").replace("[probe]", f"[probe]\n{probe}")
    out.write_text(text + extra)
    return out


@contextmanager
def injecting(tmp: Path, hold_s: float = 0.03) -> Iterator[None]:
    """The injector on the router (tests/lab/injector.py) and the rule that holds the real
    queries for it: a forged answer first, the real one `hold_s` later."""
    log = tmp / "injector.log"
    seen = log.stat().st_size if log.exists() else 0
    proc = spawn(RT, [sys.executable, str(INJECTOR), "rt0", RESOLVER, INJECTED, FORGED, str(hold_s)], log)
    try:
        for _ in range(200):
            if proc.poll() is not None or "ready" in log.read_text()[seen:]:
                break
            time.sleep(0.05)
        assert proc.poll() is None and "ready" in log.read_text()[seen:], log.read_text()[seen:]
        name = "|" + dns.name.from_text(INJECTED).to_wire().hex() + "|"
        hold = ["-p", "udp", "-d", RESOLVER, "--dport", "53", "-m", "string", "--hex-string", name, "--algo", "bm"]
        with rule(*hold, "-j", "DROP"):
            yield
    finally:
        stop(proc)


EXIT_CUT = ["-p", "tcp", "--syn", "-m", "owner", "--uid-owner", "nobody", *RESET]


@contextmanager
def exit_broken() -> Iterator[None]:
    """ss-exit's server (running as nobody) can no longer connect to anything."""
    in_ns(NET, "iptables", "-I", "OUTPUT", *EXIT_CUT)
    try:
        yield
    finally:
        in_ns(NET, "iptables", "-D", "OUTPUT", *EXIT_CUT, check=False)


def table(verdicts: pd.DataFrame) -> str:
    return verdicts[["failure", "failed_operation", "verdict", "rule", "detail"]].to_string()


def test_dns_injection_racing_the_resolver_is_blocked_dns(tricks: Path) -> None:
    with isp_resolver(tricks.parent), injecting(tricks.parent):
        verdicts = probe_round(tricks)
    row = verdicts.loc[("news-dns", "open-dns")]
    assert (row["failure"], row["failed_operation"]) == ("dns_answers_conflict", "resolve"), table(verdicts)
    assert (row["verdict"], row["rule"], row["blocking"]) == ("blocked", "dns-answers-conflict", "dns")
    # The detail lists the A query's answers in their order: the forgery, then the real one.
    with closing(sqlite3.connect(tricks.parent / "store.db")) as db:
        (detail,) = db.execute(
            "SELECT detail FROM measurements WHERE target = 'news-dns' AND path = 'open-dns' ORDER BY rowid DESC"
        ).fetchone()
    assert re.search(rf"A from {RESOLVER}: NOERROR \[{FORGED}\] at [\d.]+ ms; NOERROR \[{NEWS}\] at", detail), detail
    # The ISP's resolver is the router's own (inside the border): its answers are not injected.
    assert verdicts.loc[("news-dns", "direct"), "verdict"] == "ok", table(verdicts)
    fine = verdicts.drop(index=["shop", "news-dns"], level="target")
    assert set(fine["verdict"]) == {"ok"}, table(fine)


def test_without_the_injector_the_dns_target_is_ok(tricks: Path) -> None:
    """The same round with the router clean: the conflict above is the injector's doing."""
    with isp_resolver(tricks.parent):
        verdicts = probe_round(tricks)
    assert verdicts.loc[("news-dns", "open-dns"), "verdict"] == "ok", table(verdicts)
    assert set(verdicts.drop(index="shop", level="target")["verdict"]) == {"ok"}, table(verdicts)


def test_a_tunnel_whose_exit_is_broken_is_tunnel_down_with_its_server_answering(tricks: Path) -> None:
    """The server accepts the tunnel (its port answers, ss-local's SOCKS answers) but cannot
    reach any site: every site fails through it while direct control sites work."""
    with isp_resolver(tricks.parent), exit_broken():
        verdicts = probe_round(tricks)
    expected = {"news": "tls_handshake", "news-http": "http_round_trip", "portal": "tls_handshake"}
    for target, operation in expected.items():
        row = verdicts.loc[(target, "ss-exit")]
        assert (row["failure"], row["failed_operation"]) == ("eof_error", operation), table(verdicts)
        assert (row["verdict"], row["rule"], row["detail"]) == (
            "tunnel_down",
            "tunnel-fails-controls",
            "endpoint reachable",
        )
        assert verdicts.loc[(target, "shadowsocks"), "verdict"] == "ok"  # the other server's exit works
    assert verdicts.loc[("portal", "direct"), "verdict"] == "ok"
    # shop's certificate is wrong for everyone: still the site's problem on every path that
    # works, though the broken tunnel failed it in its own way.
    shop = verdicts.loc["shop"].drop(index="ss-exit")
    assert set(zip(shop["verdict"], shop["rule"], strict=True)) == {("site_down", "bad-certificate-everywhere")}, table(
        verdicts
    )


def test_a_throttled_tunnel_is_degraded_and_only_it(tricks: Path) -> None:
    """tbf on the router for what the Shadowsocks server's port sends to the vantage point:
    the tunnel is slow, not blocked; the other paths keep their speed. As
    test_censorship's throttling test: each round its own 1-s window, one probe at a time;
    eight throttled rounds, of which a busy machine's event loop can make some too late to
    count (their totals are left out)."""
    config = variant(
        tricks,
        "throttle-tunnel",
        probe="concurrency = 1",
        extra='[[targets]]\nname = "big"\ngroup = "control"\nkind = "http"\nurl = "https://portal.test/big.html"\n',
    )

    def rounds(count: int) -> None:
        for _ in range(count):
            result = in_ns(
                VP, sys.executable, "-m", "probe", "probe", "--target", "big", "--config", str(config), check=False
            )
            assert result.returncode == 0, result.stdout + result.stderr
            time.sleep(1.1 - time.time() % 1)  # the next round in the next second

    tc = ["tc", "-n", RT]
    with isp_resolver(tricks.parent):
        rounds(8)
        sh(*tc, *"qdisc add dev rt0 root handle 1: htb default 10".split())
        try:
            for klass in ("1:10", "1:20"):
                sh(*tc, *f"class add dev rt0 parent 1: classid {klass} htb rate 1gbit".split())
            sh(*tc, *"qdisc add dev rt0 parent 1:20 handle 20: tbf rate 1mbit burst 16kb latency 500ms".split())
            server = f"match ip src {SHADOWSOCKS}/32 match ip sport 8388 0xffff"
            sh(*tc, *f"filter add dev rt0 parent 1: protocol ip u32 {server} flowid 1:20".split())
            throttled_from = pd.Timestamp.now(tz="UTC")
            rounds(8)
        finally:
            sh(*tc, "qdisc", "del", "dev", "rt0", "root", check=False)
    m = load_measurements(tricks.parent / "throttle-tunnel.db")
    verdicts = classify(m, load_paths(tricks.parent / "throttle-tunnel.db"))
    assert set(verdicts["verdict"]) == {"ok"}, table(verdicts)  # slow is not failing
    ss = m[m["path"] == "shadowsocks"]
    before, during = ss[ss["started_at"] < throttled_from], ss[ss["started_at"] >= throttled_from]
    assert during["total_ms"].median() > 3 * before["total_ms"].median()
    assert_only_path_slowed(m, "shadowsocks", throttled_from)


INTERVAL_S = 2.0


def daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return spawn(VP, [sys.executable, "-m", "probe", "run", "--config", str(config)], log)


def outages(config: Path, *args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "probe",
            "outages",
            "--by",
            "target",
            "--format",
            "json",
            "--config",
            str(config),
            *args,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return [o for o in map(json.loads, result.stdout.splitlines()) if o["targets"] != ["shop"]]


def at(outage: dict[str, Any], edge: str) -> float:
    return float(pd.Timestamp(outage[edge]).timestamp())


def hysteresis_reference(failing: list[bool], open_after: int = 2, close_after: int = 2) -> list[tuple[int, int]]:
    """(first failing round, round that closed it or len) of each outage, round by round, as
    analysis/outages.py's Hysteresis defines them (no gaps here)."""
    found, open_at, i = [], None, 0
    while i < len(failing):
        j = i
        while j + 1 < len(failing) and failing[j + 1] == failing[i]:
            j += 1
        streak = j - i + 1
        if open_at is None and failing[i] and streak >= open_after:
            open_at = i
        elif open_at is not None and not failing[i] and streak >= close_after:
            found.append((open_at, i))
            open_at = None
        i = j + 1
    if open_at is not None:
        found.append((open_at, len(failing)))
    return found


def settled_reference(failing: list[bool], settle_after: int = 8) -> list[tuple[int, int]]:
    """hysteresis_reference with the settle rule: an outage followed by the next with no
    `settle_after` good rounds in a row between them is one outage (the same verdict here)."""
    merged: list[tuple[int, int]] = []
    for a, b in hysteresis_reference(failing):
        between = "".join("x" if f else "." for f in failing[merged[-1][1] : a]) if merged else ""
        if merged and "." * settle_after not in between:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


DIRECT_PATHS = ("direct", "open-dns")  # the two paths that reach the site without a tunnel
PARTIAL = ["-d", NEWS, "-p", "tcp", "--dport", "443", "--syn", "-m", "statistic", "--mode", "random"]


def test_partial_blocking_gives_outages_as_the_hysteresis_defines_them(tricks: Path) -> None:
    """Half the SYNs to the site dropped at random, the daemon probing every 2 s: a probe
    fails when its SYN and the one resent 1 s later are both dropped (a quarter of the
    probes), and takes a second longer when only the first is. Each failing round is judged
    blocked (tcp_ip); outages open at two failing rounds in a row and close at two good ones,
    an outage followed by another with fewer than 8 good rounds in a row between them is one
    (the settle rule) with its share of failing rounds, nothing else is an outage, and nobody
    else's pairs fail."""
    config = variant(tricks, "partial", probe=f"interval_s = {INTERVAL_S}", timeout_s=1.5)
    with isp_resolver(tricks.parent):
        proc = daemon(config, tricks.parent / "partial.log")
        try:
            time.sleep(6)
            with rule(*PARTIAL, "--probability", "0.5", "-j", "DROP"):
                started = time.time()
                time.sleep(60)
            ended = time.time()
            time.sleep(6)
        finally:
            stop(proc)
    m = load_measurements(tricks.parent / "partial.db")
    verdicts = classify(m, load_paths(tricks.parent / "partial.db"), slot_s=INTERVAL_S)
    hit = (verdicts["target"] == "news") & verdicts["path"].isin(DIRECT_PATHS)
    others = verdicts[~hit & (verdicts["target"] != "shop")]
    assert set(others["verdict"]) == {"ok"}, table(others[others["verdict"] != "ok"])
    news = verdicts[hit].sort_values("started_at")
    failed = news[news["verdict"] != "ok"]
    assert len(failed) >= 1 and (news["verdict"] == "ok").sum() >= 20, table(news)
    assert set(zip(failed["failure"], failed["failed_operation"], strict=True)) == {
        ("generic_timeout_error", "connect")
    }, table(failed)
    assert set(zip(failed["verdict"], failed["rule"], strict=True)) == {("blocked", "blocked-tcp_ip")}
    when = failed["started_at"].map(pd.Timestamp.timestamp)
    assert ((when >= started - 1) & (when <= ended + 1)).all(), table(failed)
    assert (news["connect_ms"] > 900).any(), table(news)  # some got through on the resent SYN

    found = outages(config)
    assert {(o["targets"][0], o["path"]) for o in found} <= {("news", p) for p in DIRECT_PATHS}, found
    assert all(o["verdict"] == "blocked" and o["rules"] == ["blocked-tcp_ip"] for o in found), found
    for path in DIRECT_PATHS:
        rounds = news[news["path"] == path]
        failing = (rounds["verdict"] != "ok").tolist()
        times = [t.timestamp() for t in rounds["started_at"]]
        reference = settled_reference(failing)
        expected = [(times[a], times[b] if b < len(times) else None) for a, b in reference]
        edges = [(at(o, "start"), at(o, "end")) for o in found if o["path"] == path]
        assert len(edges) == len(expected), (path, found, failing)
        for (start, end), (first, closed) in zip(edges, expected, strict=True):
            assert abs(start - first) < 0.01 and closed is not None and abs(end - closed) < 0.01, (path, found)
        shares = [o["failed_share"] for o in found if o["path"] == path]
        assert shares == [round(sum(failing[a:b]) / (b - a), 3) for a, b in reference], (path, found)
        shape = "".join(
            "x" if f else ("s" if c > 900 else ".") for f, c in zip(failing, rounds["connect_ms"], strict=True)
        )
        print(f"partial blocking, news through {path}: {shape} (x failed, s slow): outages {expected}")


def test_blocking_across_a_stopped_daemon_is_two_outages_around_an_unknown_gap(tricks: Path) -> None:
    """The site's SNI is reset from a time the daemon runs, through a stop and a restart,
    until after it: `outages` gives the outage before the stop (ended one interval after its
    last round) and the one after the restart, and nothing over the gap."""
    config = variant(tricks, "restart", probe=f"interval_s = {INTERVAL_S}", timeout_s=1.5)
    sni = ["-p", "tcp", "--dport", "443", "-m", "string", "--string", "news.test", "--algo", "bm", *RESET]
    log = tricks.parent / "restart.log"
    with isp_resolver(tricks.parent):
        proc = daemon(config, log)
        try:
            time.sleep(10)
            with rule(*sni):
                blocked_from = time.time()
                time.sleep(10)
                stop(proc)
                stopped = time.time()
                time.sleep(12)
                restarted = time.time()
                proc = daemon(config, log)
                time.sleep(12)
            blocked_until = time.time()
            time.sleep(10)
        finally:
            stop(proc)
    found = outages(config, "--target", "news", "--path", "direct")
    assert [(o["verdict"], o["rules"], o["ongoing"]) for o in found] == [("blocked", ["blocked-tls"], False)] * 2, found
    before, after = found
    slack = INTERVAL_S + 1.0
    assert abs(at(before, "start") - blocked_from) <= slack, at(before, "start") - blocked_from
    assert stopped - slack <= at(before, "end") <= stopped + slack, at(before, "end") - stopped
    # The restarted daemon needs its start-up (imports, the store's check) before its first round.
    assert restarted <= at(after, "start") <= restarted + slack + 4, at(after, "start") - restarted
    assert abs(at(after, "end") - blocked_until) <= slack, at(after, "end") - blocked_until
    assert at(before, "end") < at(after, "start")  # the gap in between: unknown, not an outage
    rounds = load_measurements(tricks.parent / "restart.db", targets=["news"], paths=["direct"])
    assert (
        not rounds["started_at"]
        .between(pd.Timestamp(stopped, unit="s", tz="UTC"), pd.Timestamp(restarted, unit="s", tz="UTC"))
        .any()
    )


CLEAN_S = 20
WINDOW_S = 16


def test_a_timeline_of_the_tricks_comes_back_as_outages(tricks: Path) -> None:
    """The daemon probes every 2 s while DNS injection and then a broken tunnel exit are
    switched on and off: `tunnelwatch outages` gives each window, with its verdict, within
    one interval of the truth, and nothing in the clean periods."""
    config = variant(tricks, "timeline-tricks", probe=f"interval_s = {INTERVAL_S}", timeout_s=1.5)
    truth: dict[str, tuple[float, float]] = {}
    with isp_resolver(tricks.parent):
        proc = daemon(config, tricks.parent / "timeline-tricks.log")
        try:
            time.sleep(CLEAN_S)
            for name, trick in (("injection", lambda: injecting(tricks.parent)), ("exit", exit_broken)):
                with trick():
                    started = time.time()
                    time.sleep(WINDOW_S)
                truth[name] = (started, time.time())
                time.sleep(CLEAN_S)
        finally:
            stop(proc)
    found = {(o["targets"][0], o["path"], o["verdict"]): o for o in outages(config)}
    expected = {
        ("news-dns", "open-dns", "blocked"): "injection",
        **{(t, "ss-exit", "tunnel_down"): "exit" for t in ("news", "news-http", "portal")},
    }
    assert set(found) == set(expected), found
    slack = INTERVAL_S + 1.0
    for key, window in expected.items():
        assert abs(at(found[key], "start") - truth[window][0]) <= slack, (
            key,
            at(found[key], "start") - truth[window][0],
        )
        assert abs(at(found[key], "end") - truth[window][1]) <= slack, (key, at(found[key], "end") - truth[window][1])
    # The injector's rounds are conflicts; the round it is stopped in can lose the query it
    # held (a timeout at resolve: blocked-dns).
    rules = found[("news-dns", "open-dns", "blocked")]["rules"]
    assert "dns-answers-conflict" in rules and set(rules) <= {"dns-answers-conflict", "blocked-dns"}, found
    # A round at a window's edge can share its 2-s slot with a control round from the other side
    # of the change (the tunnel worked for controls then): that round is blocked-behind-tunnel.
    assert all("tunnel-fails-controls" in found[k]["rules"] for k in expected if k[1] == "ss-exit"), found
