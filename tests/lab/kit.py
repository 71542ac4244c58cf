"""The censorship lab's servers: sites (nginx), resolvers (dnsmasq), tunnels (microsocks,
tinyproxy, Shadowsocks, WireGuard) in the namespaces of tests/lab/network.py, and helpers to
inject censorship on the router and run a round in the vantage point. tests/lab/conftest.py
builds it once per test module as the `lab` fixture (a config for the vantage point)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pandas as pd
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
    PREFIX,
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
)
from tests.servers import need, stop

# wireguard-go's control sockets (/run/wireguard/DEV.sock) are shared by every namespace: names
# of this lab's own, so two labs run side by side.
WG_SERVER_DEV, WG_CLIENT_DEV = f"{PREFIX}wgs", f"{PREFIX}wgc"

SITES = {"news.test": NEWS, "portal.test": PORTAL, "blocked.isp.test": BLOCKPAGE, "shop.test": SHOP}
WRONG_CERT = {"shop.test": "elsewhere.test"}  # the site's own misconfiguration, the same from everywhere


def spawn(ns: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *args], stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


DNS_PROBE = (
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.3); "
    "s.sendto(bytes.fromhex('1234010000010000000000000570726f62650474657374000001 0001'.replace(' ', '')), "
    "('{host}', 53)); assert s.recv(512)[:2] == bytes.fromhex('1234')"
)


def wait_listening(ns: str, host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
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
def running(
    ns: str, args: list[str], log: Path, host: str | None = None, port: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = spawn(ns, args, log)
    try:
        if host and port:
            wait_listening(ns, host, port, proc, log)
        else:
            time.sleep(0.3)
        yield proc
    finally:
        stop(proc)


def dnsmasq(listen: str, *options: str) -> list[str]:
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


def nginx_conf(tmp: Path, certs: dict[str, tuple[Path, Path]]) -> str:
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


def wg_key(tmp: Path, name: str) -> tuple[Path, str]:
    private = subprocess.run([need("wg"), "genkey"], capture_output=True, text=True, check=True).stdout
    (tmp / name).write_text(private)
    public = subprocess.run([need("wg"), "pubkey"], input=private, capture_output=True, text=True, check=True).stdout
    return tmp / name, public.strip()


@contextmanager
def wireguard(tmp: Path) -> Iterator[None]:
    """wireguard-go on both ends (kernel WireGuard is not available here); the vantage point
    sends what leaves from the tunnel's address through it (source-address policy routing).
    The server also lists the endpoint probe's own peer (wg-probe.key), with no allowed IPs;
    its public key is left in wg-server.pub for the config."""
    server_key, server_pub = wg_key(tmp, "wg-server.key")
    client_key, client_pub = wg_key(tmp, "wg-client.key")
    _, probe_pub = wg_key(tmp, "wg-probe.key")
    (tmp / "wg-server.pub").write_text(server_pub)
    wg, go = need("wg"), need("wireguard-go")
    with ExitStack() as stack:
        for ns, dev in ((NET, WG_SERVER_DEV), (VP, WG_CLIENT_DEV)):
            stack.enter_context(running(ns, [go, "-f", dev], tmp / f"{dev}.log"))
        in_ns(
            NET,
            wg,
            "set",
            WG_SERVER_DEV,
            "listen-port",
            str(WG_PORT),
            "private-key",
            str(server_key),
            "peer",
            client_pub,
            "allowed-ips",
            f"{WG_CLIENT}/32",
            "peer",
            probe_pub,
        )
        in_ns(NET, "ip", "addr", "add", f"{WG_SERVER}/24", "dev", WG_SERVER_DEV)
        in_ns(NET, "ip", "link", "set", WG_SERVER_DEV, "up")
        in_ns(
            VP,
            wg,
            "set",
            WG_CLIENT_DEV,
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
        in_ns(VP, "ip", "addr", "add", f"{WG_CLIENT}/24", "dev", WG_CLIENT_DEV)
        in_ns(VP, "ip", "link", "set", WG_CLIENT_DEV, "up")
        in_ns(VP, "ip", "rule", "add", "from", WG_CLIENT, "table", "100")
        in_ns(VP, "ip", "route", "add", "default", "dev", WG_CLIENT_DEV, "table", "100")
        yield


@contextmanager
def built(tmp: Path) -> Iterator[Path]:
    """The network, the sites, the clean resolver and the tunnels' exits; yields a config."""
    ca = trustme.CA()
    certs = {}
    for name in SITES:
        leaf = ca.issue_cert(WRONG_CERT.get(name, name))
        cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
        cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        certs[name] = (cert, key)
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, certs))
    (tmp / "big.html").write_text("<title>big</title>" + "a page worth throttling " * 6000)  # 144 kB
    clean_answers = [f"--address=/{name}/{address}" for name, address in SITES.items()]
    cipher = ["-k", "lab-ss-key", "-m", "chacha20-ietf-poly1305"]
    with (
        network([NEWS, PORTAL, BLOCKPAGE, SHOP, RESOLVER, SOCKS, SHADOWSOCKS, WG_ENDPOINT, HTTP_PROXY]),
        ExitStack() as stack,
    ):
        stack.enter_context(wireguard(tmp))
        (tmp / "tinyproxy.conf").write_text(
            f"Port 8888\nListen {HTTP_PROXY}\nTimeout 30\nAllow 10.66.0.0/16\nMaxClients 50\nUser root\nGroup root\n"
        )
        stack.enter_context(
            running(
                NET,
                [need("tinyproxy"), "-d", "-c", str(tmp / "tinyproxy.conf")],
                tmp / "tinyproxy.log",
                HTTP_PROXY,
                8888,
            )
        )
        stack.enter_context(
            running(NET, [need("nginx"), "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], tmp / "nginx.log", NEWS, 443)
        )
        stack.enter_context(
            running(NET, dnsmasq(RESOLVER, "--local=/test/", *clean_answers), tmp / "clean-dns.log", RESOLVER, 53)
        )
        stack.enter_context(
            running(NET, [need("microsocks"), "-i", SOCKS, "-p", "1080"], tmp / "socks.log", SOCKS, 1080)
        )
        stack.enter_context(
            running(
                NET,
                [need("ss-server"), "-s", SHADOWSOCKS, "-p", "8388", *cipher],
                tmp / "ss-server.log",
                SHADOWSOCKS,
                8388,
            )
        )
        stack.enter_context(
            running(
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
endpoint = {{ host = "{WG_ENDPOINT}", port = {WG_PORT}, transport = "udp", protocol = "wireguard", \
private_key_file = "{tmp / "wg-probe.key"}", server_public_key = "{(tmp / "wg-server.pub").read_text()}" }}
""")
        yield config


@contextmanager
def isp_resolver(tmp: Path, *options: str) -> Iterator[None]:
    """The ISP's resolver on the router: forwards to the clean one unless told to lie."""
    with running(RT, dnsmasq(RT_VP_ADDR, f"--server={RESOLVER}", *options), tmp / "isp-dns.log", RT_VP_ADDR, 53):
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


RESET = ["-j", "REJECT", "--reject-with", "tcp-reset"]


def assert_only_path_slowed(m: pd.DataFrame, path: str, since: pd.Timestamp) -> None:
    """Each round its own 1-s window judged against the rounds before it: `path`'s rounds from
    `since` are degraded (total time over 5x, 250 ms more: 144 kB through a 1 Mbit/s tbf take a
    second more, a proxy's delayed ACK of ~40 ms must not count); every other path has at most
    one slow round (a busy machine can stall one second's probe)."""
    slow = degraded(
        hourly_latency(m, window="1s"), window="1s", baseline="60s", min_windows=4, factor=5, min_increase_ms=250
    )
    assert set(slow.loc[slow["rounds"] > 1, "path"]) <= {path}, slow
    assert slow.loc[slow["path"] != path, "rounds"].sum() <= 1, slow
    slow = slow[slow["path"] == path]
    assert (slow["start"] >= since.floor("1s")).all()
    assert slow["rounds"].sum() >= 3 and (slow["factor"] > 5).all(), slow
    assert set(slow["verdict"]) == {"degraded"}
    assert all(any(r.startswith("total_ms>5x") for r in rules) for rules in slow["rules"])
