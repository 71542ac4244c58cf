"""Real censorship injected on a router between the vantage point and the "internet", and
tunnelwatch must name it: one scenario at a time, `tunnelwatch probe` run inside the vantage
point's namespace, verdicts read from what it stored."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
import pytest

from analysis.frames import load_measurements
from tests.lab.kit import RESET, assert_only_path_slowed, isp_resolver, probe_round, rule, spawn
from tests.lab.network import BLOCKPAGE, NET, NEWS, PORTAL, RT, SHADOWSOCKS, VP, WG_PORT, in_ns, sh
from tests.servers import stop


def test_clean_network_everything_works(lab: Path) -> None:
    with isp_resolver(lab.parent):
        verdicts = probe_round(lab)
    fine = verdicts.drop(index="shop", level="target")  # shop's certificate is wrong on purpose
    assert set(fine["verdict"]) == {"ok"}, fine[["failure", "failed_operation", "verdict"]].to_string()


def test_dns_poisoning_to_a_block_page_is_blocked_dns(lab: Path) -> None:
    with isp_resolver(lab.parent, f"--address=/news.test/{BLOCKPAGE}"):
        verdicts = probe_round(lab)
    news = verdicts.loc[("news", "direct")]
    assert (news["failure"], news["failed_operation"]) == ("ssl_invalid_hostname", "tls_handshake")
    assert (news["verdict"], news["blocking"]) == ("blocked", "dns")
    assert verdicts.loc[("news", "socks"), "verdict"] == "ok"
    assert verdicts.loc[("portal", "direct"), "verdict"] == "ok"


def test_reset_on_the_tls_sni_is_blocked_tls(lab: Path) -> None:
    with (
        isp_resolver(lab.parent),
        rule(
            "-p",
            "tcp",
            "--dport",
            "443",
            "-m",
            "string",
            "--string",
            "news.test",
            "--algo",
            "bm",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ),
    ):
        verdicts = probe_round(lab)
    news = verdicts.loc[("news", "direct")]
    assert (news["failure"], news["failed_operation"]) == ("connection_reset", "tls_handshake")
    assert (news["verdict"], news["blocking"]) == ("blocked", "tls")
    assert verdicts.loc[("news", "socks"), "verdict"] == "ok"  # the SNI went to port 1080, inside the tunnel


@pytest.mark.parametrize(("path", "port"), [("socks", "1080"), ("http-proxy", "8888")])
def test_a_blocked_proxy_port_is_tunnel_down(lab: Path, path: str, port: str) -> None:
    with isp_resolver(lab.parent), rule("-p", "tcp", "--dport", port, "-j", "REJECT", "--reject-with", "tcp-reset"):
        verdicts = probe_round(lab)
    for target in ("news", "news-http", "portal"):
        row = verdicts.loc[(target, path)]
        assert (row["failure"], row["failed_operation"]) == ("connection_refused", "proxy_connect")
        assert row["verdict"] == "tunnel_down"
        assert verdicts.loc[(target, "direct"), "verdict"] == "ok"


def test_a_blocked_shadowsocks_server_is_tunnel_down_with_its_port_unreachable(lab: Path) -> None:
    """The crackdown case: ss-local still answers SOCKS locally, but its server's port is
    blocked; every site fails through it while direct control sites work."""
    with isp_resolver(lab.parent), rule("-d", SHADOWSOCKS, "-p", "tcp", "--dport", "8388", *RESET):
        verdicts = probe_round(lab)
    for target in ("news", "portal"):
        row = verdicts.loc[(target, "shadowsocks")]
        assert row["verdict"] == "tunnel_down", verdicts[["failure", "failed_operation", "verdict"]].to_string()
        assert (row["rule"], row["detail"]) == ("tunnel-fails-controls", "endpoint connection_refused")
        assert verdicts.loc[(target, "socks"), "verdict"] == "ok"
    assert verdicts.loc[("portal", "direct"), "verdict"] == "ok"


def test_wireguard_with_its_udp_port_blocked_is_tunnel_down(lab: Path) -> None:
    with isp_resolver(lab.parent), rule("-p", "udp", "--dport", str(WG_PORT), "-j", "DROP"):
        verdicts = probe_round(lab)
    for target in ("news", "portal"):
        row = verdicts.loc[(target, "wireguard")]
        assert (row["verdict"], row["rule"]) == ("tunnel_down", "tunnel-fails-controls"), verdicts[
            ["failure", "failed_operation", "verdict"]
        ].to_string()
        assert row["detail"] == "endpoint generic_timeout_error"  # the handshake to the server's port went unanswered
        assert verdicts.loc[(target, "socks"), "verdict"] == "ok"
    assert verdicts.loc[("portal", "direct"), "verdict"] == "ok"


def test_the_uplink_down_is_a_local_outage(lab: Path) -> None:
    with isp_resolver(lab.parent):
        in_ns(RT, "ip", "link", "set", "rt1", "down")
        try:
            verdicts = probe_round(lab)
        finally:
            in_ns(RT, "ip", "link", "set", "rt1", "up")
    assert set(verdicts["verdict"]) == {"local_outage"}, verdicts[["failure", "failed_operation", "verdict"]]


def _news(verdicts: pd.DataFrame, target: str = "news") -> pd.Series:
    return verdicts.loc[(target, "direct")]


SCENARIOS = [
    # (name, ISP resolver options, router rule, target, failure, failed operation, blocking type)
    ("injected NXDOMAIN", ["--address=/news.test/"], None, "news", "dns_nxdomain_error", "resolve", "dns"),
    ("DNS poisoning to a sinkhole", ["--address=/news.test/10.66.2.99"], ["-d", "10.66.2.99", "-j", "DROP"], "news",
     "generic_timeout_error", "connect", "dns"),  # a sinkhole that answers nothing
    ("drop after the SNI", [], ["-p", "tcp", "--dport", "443", "-m", "string", "--string", "news.test", "--algo",
                                "bm", "-j", "DROP"], "news", "generic_timeout_error", "tls_handshake", "tls"),
    ("SYN blackhole", [], ["-d", NEWS, "-p", "tcp", "--syn", "-j", "DROP"], "news", "generic_timeout_error",
     "connect", "tcp_ip"),
    ("refused port", [], ["-d", NEWS, "-p", "tcp", "--dport", "443", *RESET], "news", "connection_refused",
     "connect", "tcp_ip"),
    ("reset on the HTTP Host", [], ["-p", "tcp", "--dport", "80", "-m", "string", "--string", "Host: news.test",
                                    "--algo", "bm", *RESET], "news-http", "connection_reset", "http_round_trip",
     "http-failure"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "resolver", "spec", "target", "failure", "operation", "blocking"), SCENARIOS, ids=[s[0] for s in SCENARIOS]
)
def test_blocking_of_one_site_is_named_with_its_type(
    lab: Path,
    name: str,
    resolver: list[str],
    spec: list[str] | None,
    target: str,
    failure: str,
    operation: str,
    blocking: str,
) -> None:
    with isp_resolver(lab.parent, *resolver), rule(*spec) if spec else ExitStack():
        verdicts = probe_round(lab)
    row = _news(verdicts, target)
    assert (row["failure"], row["failed_operation"]) == (failure, operation), name
    assert (row["verdict"], row["blocking"]) == ("blocked", blocking), verdicts[["failure", "verdict"]].to_string()
    assert verdicts.loc[(target, "socks"), "verdict"] == "ok"
    assert verdicts.loc[("portal", "direct"), "verdict"] == "ok"


def test_a_site_down_for_everyone_is_not_censorship(lab: Path) -> None:
    in_ns(NET, "iptables", "-I", "INPUT", "-d", NEWS, "-p", "tcp", "--dport", "443", *RESET)
    try:
        with isp_resolver(lab.parent):
            verdicts = probe_round(lab)
    finally:
        in_ns(NET, "iptables", "-D", "INPUT", "-d", NEWS, "-p", "tcp", "--dport", "443", *RESET, check=False)
    news = verdicts.loc["news"]
    assert news.loc["direct", "failure"] == news.loc["socks", "failure"] == "connection_refused"
    assert news.loc["shadowsocks", "failure"] != "connection_refused"  # ss-local reports it in its own way
    assert set(news["verdict"]) == {"site_down"}, news[["failure", "failed_operation", "verdict"]].to_string()
    assert set(news["rule"]) == {"fails-everywhere"}


def test_a_bad_certificate_on_the_site_itself_is_not_censorship(lab: Path) -> None:
    with isp_resolver(lab.parent):
        verdicts = probe_round(lab)
    for path in ("direct", "socks"):
        row = verdicts.loc[("shop", path)]
        assert row["failure"] == "ssl_invalid_hostname"
        assert (row["verdict"], row["rule"]) == ("site_down", "bad-certificate-everywhere")


INTERVAL_S = 2.0
CLEAN_S = 45  # the clean periods around the two injected windows: enough placebo windows for `events check`


def test_a_timeline_of_injected_censorship_comes_back_as_outages(lab: Path) -> None:
    """The daemon probes every 2 s inside the vantage point while censorship is switched on
    and off; `tunnelwatch outages` must give each window, with its verdict, within one
    interval of the truth, and nothing in the clean periods."""
    config = lab.with_name("timeline.toml")
    text = (
        lab.read_text()
        .replace("[probe]", f"[probe]\ninterval_s = {INTERVAL_S}")
        .replace(str(lab.parent / "store.db"), str(lab.parent / "timeline.db"))
    )
    config.write_text(text.replace("timeout_s = 3", "timeout_s = 1.5"))
    sni = ["-p", "tcp", "--dport", "443", "-m", "string", "--string", "news.test", "--algo", "bm", *RESET]
    socks = ["-p", "tcp", "--dport", "1080", *RESET]
    truth: dict[str, tuple[float, float]] = {}
    with isp_resolver(lab.parent):
        daemon = spawn(VP, [sys.executable, "-m", "probe", "run", "--config", str(config)], lab.parent / "timeline.log")
        try:
            time.sleep(CLEAN_S)
            for name, spec in (("sni", sni), ("socks", socks)):
                with rule(*spec):
                    started = time.time()
                    time.sleep(16)
                truth[name] = (started, time.time())
                time.sleep(CLEAN_S)
        finally:
            stop(daemon)
    result = subprocess.run(
        [sys.executable, "-m", "probe", "outages", "--by", "target", "--format", "json", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    outages = [o for o in map(json.loads, result.stdout.splitlines()) if o["targets"] != ["shop"]]
    found = {(o["targets"][0], o["path"], o["verdict"]): o for o in outages}
    expected = {
        ("news", "direct", "blocked"): "sni",
        **{(t, "socks", "tunnel_down"): "socks" for t in ("news", "news-http", "portal")},
    }
    assert set(found) == set(expected), outages
    slack = INTERVAL_S + 1.0
    for key, window in expected.items():
        start = pd.Timestamp(found[key]["start"]).timestamp()
        end = pd.Timestamp(found[key]["end"]).timestamp()
        assert abs(start - truth[window][0]) <= slack, (key, start - truth[window][0])
        assert abs(end - truth[window][1]) <= slack, (key, end - truth[window][1])

    # The daemon judged the rounds as they came (`alerts evaluate` each interval): its alerts are
    # these outages, each opened and closed, at the same times.
    listed = subprocess.run(
        [sys.executable, "-m", "probe", "alerts", "list", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0, listed.stderr
    alerts = [a for a in map(json.loads, listed.stdout.splitlines()) if a["target"] != "shop"]
    by_key = {(a["target"], a["path"], a["verdict"]): a for a in alerts}
    assert set(by_key) == set(expected) and len(alerts) == len(expected), alerts
    for key, alert in by_key.items():
        assert alert["end"] is not None and alert["told"] == "back", alert
        for edge in ("start", "end"):
            assert abs(pd.Timestamp(alert[edge]) - pd.Timestamp(found[key][edge])) < pd.Timedelta(milliseconds=2)

    # Events placed on the two injected windows, and one on a clean period.
    def at(t: float) -> str:
        return pd.Timestamp(t, unit="s", tz="UTC").isoformat()

    clean = truth["sni"][1] + CLEAN_S / 3
    events = lab.with_name("lab-events.toml")
    events.write_text(
        "".join(
            f'[[events]]\nid = "{name}"\ntitle = "{name}"\ncategory = "other"\nstart = {at(a)}\nend = {at(b)}\n'
            for name, (a, b) in {
                "lab-sni": truth["sni"],
                "lab-socks": truth["socks"],
                "lab-clean": (clean, clean + 12),
            }.items()
        )
    )
    # Seconds as units, a baseline of 4 s right before each window, placebo dates 1 s from the
    # events: the clean periods hold some 50 placebo windows as long as an injected one, each with
    # 19 or more others far enough from it to calibrate a p-value.
    short = [
        "--unit",
        "1s",
        "--baseline",
        "4s",
        "--gap",
        "0",
        "--onset-before",
        "0",
        "--onset-after",
        "0",
        "--placebo-gap",
        "1s",
        "--format",
        "json",
        "--config",
        str(config),
        "--events",
        str(events),
    ]
    for event, only in (
        ("lab-sni", ["--target", "news", "--path", "direct"]),
        ("lab-socks", ["--target", "portal", "--path", "socks"]),
    ):
        checks = {}
        for checked in (event, "lab-clean"):  # one at a time: no q-value correction between them
            result = subprocess.run(
                [sys.executable, "-m", "probe", "events", "check", "--event", checked, *only, *short],
                capture_output=True,
                text=True,
            )
            assert result.returncode == 0, result.stderr
            checks.update({c["event"]: c for c in map(json.loads, result.stdout.splitlines())})
        assert checks[event]["verdict"].startswith("effect"), checks[event]
        assert checks[event]["p_value"] < 0.05 and checks[event]["inside_rate"] > 0.5
        assert checks["lab-clean"]["verdict"].startswith("no effect"), checks["lab-clean"]
        assert checks["lab-clean"]["inside_rate"] == 0


def test_throttling_with_tc_tbf_is_degraded(lab: Path) -> None:
    """tbf on the router slows what the site sends to the vantage point directly; the
    tunnels' traffic comes from their servers and is not throttled. Each round is its own
    1-s window, judged against the rounds before it. One probe at a time: five 144 kB pages
    at once keep a busy machine's event loop over 10 ms late, and such totals are left out."""
    config = lab.with_name("throttle.toml")
    config.write_text(
        lab.read_text()
        .replace(str(lab.parent / "store.db"), str(lab.parent / "throttle.db"))
        .replace("[probe]", "[probe]\nconcurrency = 1")
        + '[[targets]]\nname = "big"\ngroup = "control"\nkind = "http"\n'
        'url = "https://portal.test/big.html"\n'
    )

    def rounds(count: int) -> None:
        for _ in range(count):
            result = in_ns(
                VP, sys.executable, "-m", "probe", "probe", "--target", "big", "--config", str(config), check=False
            )
            assert result.returncode == 0, result.stdout + result.stderr
            time.sleep(1.1 - time.time() % 1)  # the next round in the next second

    with isp_resolver(lab.parent):
        rounds(8)
        tc = ["tc", "-n", RT]
        sh(*tc, *"qdisc add dev rt0 root handle 1: htb default 10".split())
        try:
            for klass in ("1:10", "1:20"):
                sh(*tc, *f"class add dev rt0 parent 1: classid {klass} htb rate 1gbit".split())
            sh(*tc, *"qdisc add dev rt0 parent 1:20 handle 20: tbf rate 1mbit burst 16kb latency 500ms".split())
            sh(*tc, *f"filter add dev rt0 parent 1: protocol ip u32 match ip src {PORTAL}/32 flowid 1:20".split())
            throttled_from = pd.Timestamp.now(tz="UTC")
            rounds(4)
        finally:
            sh(*tc, "qdisc", "del", "dev", "rt0", "root", check=False)
    m = load_measurements(lab.parent / "throttle.db")
    direct = m[m["path"] == "direct"]
    before, during = direct[direct["started_at"] < throttled_from], direct[direct["started_at"] >= throttled_from]
    assert during["ok"].all() and during["total_ms"].median() > 3 * before["total_ms"].median()
    # 144 kB at 1 Mbit/s take a second more; a proxy's delayed ACK (~40 ms) must not count
    assert_only_path_slowed(m, "direct", throttled_from)
