"""V2Ray and OpenVPN in the censorship lab, probed the way a user points tunnelwatch at them:
V2Ray's client through its local SOCKS port, OpenVPN's client by its tunnel address and by
its interface. Each is blocked on the router the way censors block it, and the verdict must
say the tunnel is down while direct control sites work.

V2Ray: VLESS over WebSocket behind nginx, which terminates TLS for cdn.test (a CDN-fronted
server, as the 2022 TLS wave met them); the client in the vantage point exposes SOCKS.
OpenVPN: a UDP server in the internet with a throwaway PKI (trustme, `dh none`), a client in
the vantage point; what leaves from its address or its interface goes through the tunnel.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pandas as pd
import pytest
import trustme

from analysis.frames import load_measurements
from tests.lab.kit import RESET, isp_resolver, probe_round, rule, running, spawn
from tests.lab.network import NET, RESOLVER, RT, VP, in_ns
from tests.servers import need, stop

V2RAY_FRONT, OPENVPN_SERVER = "10.66.2.40", "10.66.2.41"
CDN, V2RAY_PATH, V2RAY_SOCKS, V2RAY_INBOUND = "cdn.test", "/v2", 1090, 10086
OPENVPN_PORT, OPENVPN_SUBNET, OPENVPN_CLIENT = 1194, "10.98.0.0", "10.98.0.2"
OPENVPN_DEV, OPENVPN_TABLE = "ovpnc", "101"
CONTROLS = ("portal",)
SITES = ("news", "news-http", "portal")


def pem(tmp: Path, name: str, leaf: trustme.LeafCert) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert.write_bytes(b"".join(part.bytes() for part in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return cert, key


def front_conf(tmp: Path, cert: Path, key: Path) -> str:
    """nginx as the V2Ray server's front: TLS for cdn.test, the WebSocket path to V2Ray."""
    temp = " ".join(f"{k}_temp_path {tmp / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (
        f"user root; daemon off; worker_processes 1; pid {tmp / 'front.pid'}; error_log {tmp / 'front-error.log'};\n"
        f"events {{ worker_connections 64; }}\nhttp {{ access_log off; {temp}\n"
        f"server {{ listen {V2RAY_FRONT}:443 ssl; server_name {CDN}; ssl_certificate {cert}; ssl_certificate_key {key};"
        f" location {V2RAY_PATH} {{ proxy_pass http://127.0.0.1:{V2RAY_INBOUND}; proxy_http_version 1.1;"
        " proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection upgrade; proxy_read_timeout 300s; }"
        " location / { default_type text/html; return 200 '<title>cdn</title>'; } }\n}\n"
    )


@contextmanager
def v2ray(tmp: Path) -> Iterator[None]:
    """VLESS over WebSocket, TLS at nginx. No routing rules and no DNS section: V2Ray needs no
    geoip or geosite files and fetches nothing."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "v2ray-ca.pem"))
    cert, key = pem(tmp, CDN, ca.issue_cert(CDN))
    (tmp / "front.conf").write_text(front_conf(tmp, cert, key))
    user = str(uuid.uuid4())
    server = {
        "log": {"loglevel": "warning"},
        "inbounds": [
            {
                "listen": "127.0.0.1",
                "port": V2RAY_INBOUND,
                "protocol": "vless",
                "settings": {"clients": [{"id": user}], "decryption": "none"},
                "streamSettings": {"network": "ws", "wsSettings": {"path": V2RAY_PATH}},
            }
        ],
        "outbounds": [{"protocol": "freedom"}],
    }
    tls = {
        "serverName": CDN,
        "disableSystemRoot": True,
        "certificates": [{"usage": "verify", "certificateFile": str(tmp / "v2ray-ca.pem")}],
    }
    client = {
        "log": {"loglevel": "warning"},
        "inbounds": [{"listen": "127.0.0.1", "port": V2RAY_SOCKS, "protocol": "socks", "settings": {"auth": "noauth"}}],
        "outbounds": [
            {
                "protocol": "vless",
                "settings": {
                    "vnext": [{"address": V2RAY_FRONT, "port": 443, "users": [{"id": user, "encryption": "none"}]}]
                },
                "streamSettings": {
                    "network": "ws",
                    "security": "tls",
                    "tlsSettings": tls,
                    "wsSettings": {"path": V2RAY_PATH},
                },
            }
        ],
    }
    for name, content in (("v2ray-server.json", server), ("v2ray-client.json", client)):
        (tmp / name).write_text(json.dumps(content, indent=1))
    v2 = need("v2ray")
    with ExitStack() as stack:
        stack.enter_context(
            running(
                NET,
                [v2, "-config", str(tmp / "v2ray-server.json")],
                tmp / "v2ray-server.log",
                "127.0.0.1",
                V2RAY_INBOUND,
            )
        )
        stack.enter_context(
            running(
                NET,
                [need("nginx"), "-c", str(tmp / "front.conf"), "-p", str(tmp)],
                tmp / "front.log",
                V2RAY_FRONT,
                443,
            )
        )
        stack.enter_context(
            running(
                VP, [v2, "-config", str(tmp / "v2ray-client.json")], tmp / "v2ray-client.log", "127.0.0.1", V2RAY_SOCKS
            )
        )
        yield


def openvpn_pki(tmp: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "openvpn-ca.pem"))
    pem(tmp, "openvpn-server", ca.issue_cert("vpn.test", common_name="vpn.test"))
    pem(tmp, "openvpn-client", ca.issue_cert("lab-client", common_name="lab-client"))


def openvpn_server_conf(tmp: Path) -> str:
    (tmp / "ccd").mkdir(exist_ok=True)
    (tmp / "ccd" / "lab-client").write_text(f"ifconfig-push {OPENVPN_CLIENT} 255.255.255.0\n")
    return f"""
dev ovpns
dev-type tun
proto udp4
local {OPENVPN_SERVER}
port {OPENVPN_PORT}
topology subnet
server {OPENVPN_SUBNET} 255.255.255.0
client-config-dir {tmp / "ccd"}
keepalive 10 60
ca {tmp / "openvpn-ca.pem"}
cert {tmp / "openvpn-server.crt"}
key {tmp / "openvpn-server.key"}
dh none
disable-dco
verb 3
"""


def openvpn_client_conf(tmp: Path) -> str:
    return f"""
client
dev {OPENVPN_DEV}
dev-type tun
proto udp4
remote {OPENVPN_SERVER} {OPENVPN_PORT}
nobind
connect-retry 1
ca {tmp / "openvpn-ca.pem"}
cert {tmp / "openvpn-client.crt"}
key {tmp / "openvpn-client.key"}
remote-cert-tls server
disable-dco
verb 3
"""


class OpenVPNClient:
    """The client in the vantage point, restartable: a test that blocks the handshake starts
    it anew so that it must handshake again."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "openvpn-client.log"

    def start(self, *, wait: bool = True) -> None:
        self.log.write_text("")
        self.proc = spawn(VP, [need("openvpn"), "--config", str(self.tmp / "openvpn-client.conf")], self.log)
        if wait:
            self.wait_up()

    def wait_up(self) -> None:
        for _ in range(300):
            if "Initialization Sequence Completed" in self.log.read_text(errors="replace"):
                # What leaves from the tunnel's address or is bound to its interface takes table 101.
                in_ns(VP, "ip", "route", "replace", "default", "dev", OPENVPN_DEV, "table", OPENVPN_TABLE)
                return
            time.sleep(0.1)
        raise RuntimeError(f"the OpenVPN client did not connect: {self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@contextmanager
def openvpn(tmp: Path) -> Iterator[OpenVPNClient]:
    """The server forwards and masquerades what comes out of the tunnel, as a VPN server does
    (the lab's sites are its own addresses, so they answer through the tunnel either way)."""
    openvpn_pki(tmp)
    (tmp / "openvpn-server.conf").write_text(openvpn_server_conf(tmp))
    (tmp / "openvpn-client.conf").write_text(openvpn_client_conf(tmp))
    in_ns(NET, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    in_ns(
        NET, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"{OPENVPN_SUBNET}/24", "-o", "in0", "-j", "MASQUERADE"
    )
    in_ns(VP, "ip", "rule", "add", "from", OPENVPN_CLIENT, "table", OPENVPN_TABLE)
    in_ns(VP, "ip", "rule", "add", "oif", OPENVPN_DEV, "table", OPENVPN_TABLE)  # SO_BINDTODEVICE sockets
    client = OpenVPNClient(tmp)
    with running(NET, [need("openvpn"), "--config", str(tmp / "openvpn-server.conf")], tmp / "openvpn-server.log"):
        client.start()
        try:
            yield client
        finally:
            client.stop()


PATHS = f"""
[[paths]]
name = "v2ray"
kind = "socks5"
label = "v2ray"
host = "127.0.0.1"
port = {V2RAY_SOCKS}
endpoint = {{ host = "{V2RAY_FRONT}", port = 443, transport = "tcp" }}
[[paths]]
name = "openvpn"
kind = "bind"
label = "openvpn"
address = "{OPENVPN_CLIENT}"
resolver = ["{RESOLVER}"]
endpoint = {{ host = "{OPENVPN_SERVER}", port = {OPENVPN_PORT}, transport = "udp", protocol = "openvpn" }}
[[paths]]
name = "openvpn-dev"
kind = "bind"
label = "openvpn"
interface = "{OPENVPN_DEV}"
resolver = ["{RESOLVER}"]
endpoint = {{ host = "{OPENVPN_SERVER}", port = {OPENVPN_PORT}, transport = "udp", protocol = "openvpn" }}
"""


@pytest.fixture(scope="module")
def tunnels(lab: Path) -> Iterator[tuple[Path, OpenVPNClient]]:
    """The lab's config with the V2Ray and OpenVPN paths added (the same store)."""
    tmp = lab.parent / "tunnels"
    tmp.mkdir()
    for address in (V2RAY_FRONT, OPENVPN_SERVER):
        in_ns(NET, "ip", "addr", "add", f"{address}/32", "dev", "lo")
    config = lab.with_name("tunnels.toml")
    config.write_text(lab.read_text() + PATHS)
    with v2ray(tmp), openvpn(tmp) as client:
        yield config, client


def table(verdicts: pd.DataFrame) -> str:
    return verdicts[["failure", "failed_operation", "verdict", "rule", "detail"]].to_string()


def endpoint_probes(config: Path) -> pd.DataFrame:
    """The direct probes of the tunnel servers' ports in the store's latest round."""
    m = load_measurements(config.parent / "store.db")
    m = m[m["round_id"] == m.loc[m["started_at"].idxmax(), "round_id"]]
    return m[m["group"] == "endpoint"].set_index("target")


def test_clean_network_every_tunnel_works(tunnels: tuple[Path, OpenVPNClient]) -> None:
    config, _ = tunnels
    with isp_resolver(config.parent):
        verdicts = probe_round(config)
    for path in ("v2ray", "openvpn", "openvpn-dev"):
        for target in SITES:
            assert verdicts.loc[(target, path), "verdict"] == "ok", table(verdicts)
    # The OpenVPN server answered the endpoint probe's hard reset; nginx accepted the connect.
    probes = endpoint_probes(config)
    for path in ("v2ray", "openvpn", "openvpn-dev"):
        assert probes.loc[f"{path}-endpoint", "ok"], probes[["ok", "failure", "failed_operation"]].to_string()


def steps(rows: pd.DataFrame) -> set[tuple[str, str]]:
    return set(rows[["failure", "failed_operation"]].itertuples(index=False, name=None))


def tunnel_down(verdicts: pd.DataFrame, path: str) -> pd.DataFrame:
    """The path's rows for the sites, each tunnel_down, while the control sites work directly."""
    rows = verdicts.xs(path, level="path").loc[list(SITES)]
    assert set(rows["verdict"]) == {"tunnel_down"}, table(verdicts)
    for target in CONTROLS:
        assert verdicts.loc[(target, "direct"), "verdict"] == "ok", table(verdicts)
    return rows


def test_v2ray_with_its_server_name_reset_is_tunnel_down(tunnels: tuple[Path, OpenVPNClient]) -> None:
    """The 2022 TLS wave: a reset on the tunnel's TLS server name. V2Ray's client answers
    SOCKS at once and closes the connection when its server cannot be reached; the server's
    port still answers a connect, and news.test (another name) works directly."""
    config, _ = tunnels
    sni = ["-p", "tcp", "--dport", "443", "-m", "string", "--string", CDN, "--algo", "bm", *RESET]
    with isp_resolver(config.parent), rule(*sni):
        verdicts = probe_round(config)
    rows = tunnel_down(verdicts, "v2ray")
    assert set(rows["failure"]) == {"eof_error"}, table(verdicts)
    assert set(rows["rule"]) == {"tunnel-fails-controls"}
    assert set(rows["detail"]) == {"endpoint reachable"}
    assert verdicts.loc[("news", "direct"), "verdict"] == "ok"


def test_v2ray_with_its_server_address_dropped_is_tunnel_down(tunnels: tuple[Path, OpenVPNClient]) -> None:
    config, _ = tunnels
    with isp_resolver(config.parent), rule("-d", V2RAY_FRONT, "-j", "DROP"):
        verdicts = probe_round(config)
    rows = tunnel_down(verdicts, "v2ray")
    assert set(rows["failure"]) == {"generic_timeout_error"}, table(verdicts)
    assert set(rows["rule"]) == {"tunnel-fails-controls"}
    assert set(rows["detail"]) == {"endpoint generic_timeout_error"}  # the direct connect to its port
    assert verdicts.loc[("news", "socks"), "verdict"] == "ok"


def test_openvpn_with_its_port_dropped_is_tunnel_down(tunnels: tuple[Path, OpenVPNClient]) -> None:
    """The client keeps its address and interface; nothing comes back through them, and the
    first step, the lookup through the tunnel, times out."""
    config, _ = tunnels
    with isp_resolver(config.parent), rule("-p", "udp", "--dport", str(OPENVPN_PORT), "-j", "DROP"):
        verdicts = probe_round(config)
    for path in ("openvpn", "openvpn-dev"):
        rows = tunnel_down(verdicts, path)
        assert steps(rows) == {("generic_timeout_error", "resolve")}
        assert set(rows["rule"]) == {"tunnel-fails-controls"}
        assert set(rows["detail"]) == {"endpoint generic_timeout_error"}  # no answer to the probe's hard reset
    assert verdicts.loc[("news", "v2ray"), "verdict"] == "ok"


# OpenVPN's first packet: opcode P_CONTROL_HARD_RESET_CLIENT_V2 (7) in the top five bits of the
# first byte of the UDP payload (u32: the IP header's length, then 8 bytes of UDP header).
HARD_RESET = ["-p", "udp", "--dport", str(OPENVPN_PORT), "-m", "u32", "--u32", "0>>22&0x3C@8>>27=7", "-j", "DROP"]


def hard_resets_dropped() -> int:
    listing = in_ns(RT, "iptables", "-L", "FORWARD", "-v", "-x", "-n").stdout.splitlines()
    return sum(int(line.split()[0]) for line in listing if "u32" in line)


def test_openvpn_with_its_handshake_dropped_is_tunnel_down(tunnels: tuple[Path, OpenVPNClient]) -> None:
    """Dropping the handshake leaves a live tunnel alone; the client, restarted, never gets
    its address or interface, and binding to them fails: the tunnel's own step."""
    config, client = tunnels
    try:
        with isp_resolver(config.parent), rule(*HARD_RESET):
            live = probe_round(config)
            assert set(live.loc[[("portal", "openvpn"), ("portal", "openvpn-dev")], "verdict"]) == {"ok"}, table(live)
            client.stop()
            client.start(wait=False)
            for _ in range(100):
                if hard_resets_dropped():
                    break
                time.sleep(0.1)
            assert hard_resets_dropped(), client.log.read_text(errors="replace")
            verdicts = probe_round(config)
        assert "Initialization Sequence Completed" not in client.log.read_text(errors="replace")
    finally:
        client.stop()
        client.start()
    failures = {"openvpn": "address_not_available", "openvpn-dev": "interface_not_found"}
    for path, failure in failures.items():
        rows = tunnel_down(verdicts, path)
        assert steps(rows) == {(failure, "bind")}, table(verdicts)
        assert set(rows["rule"]) == {"tunnel-own-step"}
        assert set(rows["detail"]) == {"endpoint generic_timeout_error"}  # the probe's hard reset dropped too
