"""Real censorship injected on a router between the vantage point and the "internet", and
tunnelwatch must name it: one scenario at a time, `tunnelwatch probe` run inside the vantage
point's namespace, verdicts read from what it stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pandas as pd
import pytest
import trustme

from analysis.frames import load_measurements, load_paths
from analysis.outages import degraded
from analysis.summary import hourly_latency
from analysis.verdicts import classify
from tests.lab.network import (
    BLOCKPAGE,
    HTTP_PROXY,
    NET,
    NEWS,
    PORTAL,
    RESOLVER,
    RT,
    RT_VP_ADDR,
    SHADOWSOCKS,
    SHOP,
    SOCKS,
    VP,
    WG_CLIENT,
    WG_ENDPOINT,
    WG_PORT,
    WG_SERVER,
    in_ns,
    network,
    sh,
)
from tests.servers import need, stop

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root for network namespaces and iptables")

SITES = {"news.test": NEWS, "portal.test": PORTAL, "blocked.isp.test": BLOCKPAGE, "shop.test": SHOP}
WRONG_CERT = {"shop.test": "elsewhere.test"}  # the site's own misconfiguration, the same from everywhere


def _start(ns: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *args], stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


DNS_PROBE = (
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.3); "
    "s.sendto(bytes.fromhex('1234010000010000000000000570726f62650474657374000001 0001'.replace(' ', '')), "
    "('{host}', 53)); assert s.recv(512)[:2] == bytes.fromhex('1234')"
)


def _wait(ns: str, host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    probe = (
        DNS_PROBE.format(host=host)
        if port == 53
        else f"import socket; socket.create_connection(('{host}', {port}), 0.5).close()"
    )
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited: {log.read_text(errors='replace')}")
        if in_ns(ns, sys.executable, "-c", probe, check=False).returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} in {ns}: {log.read_text(errors='replace')}")


@contextmanager
def _running(
    ns: str, args: list[str], log: Path, host: str | None = None, port: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = _start(ns, args, log)
    try:
        if host and port:
            _wait(ns, host, port, proc, log)
        else:
            time.sleep(0.3)
        yield proc
    finally:
        stop(proc)


def _dnsmasq(listen: str, *options: str) -> list[str]:
    return [
        need("dnsmasq"),
        "--keep-in-foreground",
        f"--listen-address={listen}",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--pid-file=",
        *options,
    ]


def _nginx_conf(tmp: Path, certs: dict[str, tuple[Path, Path]]) -> str:
    plain = (
        f"server {{ listen {NEWS}:80; location / {{ default_type text/html; return 200 '<title>news</title>'; }} }}\n"
    )
    servers = plain + "".join(
        f"server {{ listen {address}:443 ssl; ssl_certificate {certs[name][0]}; ssl_certificate_key {certs[name][1]};"
        f" location = /big.html {{ root {tmp}; }}"
        f" location / {{ default_type text/html; return 200 '<title>{'Blocked' if name.startswith('blocked') else name}"
        f"</title>{'access denied' if name.startswith('blocked') else 'the real page ' * 50}'; }} }}\n"
        for name, address in SITES.items()
    )
    temp = " ".join(f"{k}_temp_path {tmp / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (
        f"user root; daemon off; worker_processes 1; pid {tmp / 'nginx.pid'}; error_log {tmp / 'error.log'};\n"
        f"events {{ worker_connections 64; }}\nhttp {{ access_log off; {temp}\n{servers}}}\n"
    )


def _key(tmp: Path, name: str) -> tuple[Path, str]:
    private = subprocess.run([need("wg"), "genkey"], capture_output=True, text=True, check=True).stdout
    (tmp / name).write_text(private)
    public = subprocess.run([need("wg"), "pubkey"], input=private, capture_output=True, text=True, check=True).stdout
    return tmp / name, public.strip()


@contextmanager
def _wireguard(tmp: Path) -> Iterator[None]:
    """wireguard-go on both ends (kernel WireGuard is not available here); the vantage point
    sends what leaves from the tunnel's address through it (source-address policy routing)."""
    server_key, server_pub = _key(tmp, "wg-server.key")
    client_key, client_pub = _key(tmp, "wg-client.key")
    wg, go = need("wg"), need("wireguard-go")
    with ExitStack() as stack:
        for ns, dev in ((NET, "wgs"), (VP, "wgc")):
            stack.enter_context(_running(ns, [go, "-f", dev], tmp / f"{dev}.log"))
        in_ns(
            NET,
            wg,
            "set",
            "wgs",
            "listen-port",
            str(WG_PORT),
            "private-key",
            str(server_key),
            "peer",
            client_pub,
            "allowed-ips",
            f"{WG_CLIENT}/32",
        )
        in_ns(NET, "ip", "addr", "add", f"{WG_SERVER}/24", "dev", "wgs")
        in_ns(NET, "ip", "link", "set", "wgs", "up")
        in_ns(
            VP,
            wg,
            "set",
            "wgc",
            "private-key",
            str(client_key),
            "peer",
            server_pub,
            "endpoint",
            f"{WG_ENDPOINT}:{WG_PORT}",
            "allowed-ips",
            "0.0.0.0/0",
            "persistent-keepalive",
            "1",
        )
        in_ns(VP, "ip", "addr", "add", f"{WG_CLIENT}/24", "dev", "wgc")
        in_ns(VP, "ip", "link", "set", "wgc", "up")
        in_ns(VP, "ip", "rule", "add", "from", WG_CLIENT, "table", "100")
        in_ns(VP, "ip", "route", "add", "default", "dev", "wgc", "table", "100")
        yield


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The network, the sites, the clean resolver and the tunnel's exit; yields a config."""
    tmp = tmp_path_factory.mktemp("lab")
    ca = trustme.CA()
    certs = {}
    for name in SITES:
        leaf = ca.issue_cert(WRONG_CERT.get(name, name))
        cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
        cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        certs[name] = (cert, key)
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    (tmp / "nginx.conf").write_text(_nginx_conf(tmp, certs))
    (tmp / "big.html").write_text("<title>big</title>" + "a page worth throttling " * 6000)  # 144 kB
    clean_answers = [f"--address=/{name}/{address}" for name, address in SITES.items()]
    cipher = ["-k", "lab-ss-key", "-m", "chacha20-ietf-poly1305"]
    with (
        network([NEWS, PORTAL, BLOCKPAGE, SHOP, RESOLVER, SOCKS, SHADOWSOCKS, WG_ENDPOINT, HTTP_PROXY]),
        ExitStack() as stack,
    ):
        stack.enter_context(_wireguard(tmp))
        (tmp / "tinyproxy.conf").write_text(
            f"Port 8888\nListen {HTTP_PROXY}\nTimeout 30\nAllow 10.66.0.0/16\nMaxClients 50\nUser root\nGroup root\n"
        )
        stack.enter_context(
            _running(
                NET,
                [need("tinyproxy"), "-d", "-c", str(tmp / "tinyproxy.conf")],
                tmp / "tinyproxy.log",
                HTTP_PROXY,
                8888,
            )
        )
        stack.enter_context(
            _running(NET, [need("nginx"), "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], tmp / "nginx.log", NEWS, 443)
        )
        stack.enter_context(
            _running(NET, _dnsmasq(RESOLVER, "--local=/test/", *clean_answers), tmp / "clean-dns.log", RESOLVER, 53)
        )
        stack.enter_context(
            _running(NET, [need("microsocks"), "-i", SOCKS, "-p", "1080"], tmp / "socks.log", SOCKS, 1080)
        )
        stack.enter_context(
            _running(
                NET,
                [need("ss-server"), "-s", SHADOWSOCKS, "-p", "8388", *cipher],
                tmp / "ss-server.log",
                SHADOWSOCKS,
                8388,
            )
        )
        stack.enter_context(
            _running(
                VP,
                [need("ss-local"), "-s", SHADOWSOCKS, "-p", "8388", "-b", "127.0.0.1", "-l", "1081", *cipher],
                tmp / "ss-local.log",
                "127.0.0.1",
                1081,
            )
        )
        config = tmp / "tunnelwatch.toml"
        config.write_text(f"""
[vantage]
name = "lab-vantage"
[store]
path = "{tmp / "store.db"}"
[probe]
timeout_s = 3
ca_file = "{tmp / "ca.pem"}"
[metrics]
enabled = false
[[targets]]
name = "news"
group = "blocked"
kind = "http"
url = "https://news.test/"
[[targets]]
name = "news-http"
group = "blocked"
kind = "http"
url = "http://news.test/"
[[targets]]
name = "shop"
group = "blocked"
kind = "http"
url = "https://shop.test/"
[[targets]]
name = "portal"
group = "control"
kind = "http"
url = "https://portal.test/"
[[paths]]
name = "direct"
kind = "direct"
resolver = ["{RT_VP_ADDR}"]
[[paths]]
name = "socks"
kind = "socks5"
host = "{SOCKS}"
port = 1080
remote_dns = false
resolver = ["{RESOLVER}"]
[[paths]]
name = "shadowsocks"
kind = "socks5"
label = "shadowsocks"
host = "127.0.0.1"
port = 1081
remote_dns = false
resolver = ["{RESOLVER}"]
endpoint = {{ host = "{SHADOWSOCKS}", port = 8388, transport = "tcp" }}
[[paths]]
name = "http-proxy"
kind = "http"
host = "{HTTP_PROXY}"
port = 8888
[[paths]]
name = "wireguard"
kind = "bind"
label = "wireguard"
address = "{WG_CLIENT}"
resolver = ["{RESOLVER}"]
endpoint = {{ host = "{WG_ENDPOINT}", port = {WG_PORT}, transport = "udp" }}
""")
        yield config


@contextmanager
def isp_resolver(tmp: Path, *options: str) -> Iterator[None]:
    """The ISP's resolver on the router: forwards to the clean one unless told to lie."""
    with _running(RT, _dnsmasq(RT_VP_ADDR, f"--server={RESOLVER}", *options), tmp / "isp-dns.log", RT_VP_ADDR, 53):
        yield


@contextmanager
def rule(*spec: str) -> Iterator[None]:
    in_ns(RT, "iptables", "-I", "FORWARD", *spec)
    try:
        yield
    finally:
        in_ns(RT, "iptables", "-D", "FORWARD", *spec, check=False)


def probe_round(config: Path) -> pd.DataFrame:
    """`tunnelwatch probe` inside the vantage point; the verdicts of the round it stored."""
    db = config.parent / "store.db"
    before = set(load_measurements(db)["round_id"]) if db.exists() else set()
    result = in_ns(VP, sys.executable, "-m", "probe", "probe", "--config", str(config), check=False)
    assert result.returncode in (0, 1), result.stderr
    measurements = load_measurements(db)
    this_round = measurements[~measurements["round_id"].isin(before)]  # earlier rounds share its slot
    return classify(this_round, load_paths(db)).set_index(["target", "path"])


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


RESET = ["-j", "REJECT", "--reject-with", "tcp-reset"]
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
        daemon = _start(
            VP, [sys.executable, "-m", "probe", "run", "--config", str(config)], lab.parent / "timeline.log"
        )
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
    slow = degraded(
        hourly_latency(m, window="1s"), window="1s", baseline="60s", min_windows=4, factor=5, min_increase_ms=250
    )
    # The tunnels were not throttled: at most one of their rounds slow (a busy machine can stall
    # one second's probe through a proxy), the direct path's throttled rounds slow.
    assert set(slow.loc[slow["rounds"] > 1, "path"]) <= {"direct"}, slow
    assert slow.loc[slow["path"] != "direct", "rounds"].sum() <= 1, slow
    slow = slow[slow["path"] == "direct"]
    assert (slow["start"] >= throttled_from.floor("1s")).all()
    assert slow["rounds"].sum() >= 3 and (slow["factor"] > 5).all()
    assert all(any(r.startswith("total_ms>5x") for r in rules) for rules in slow["rules"])
