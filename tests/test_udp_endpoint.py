"""UDP endpoint probes against real servers: wireguard-go and OpenVPN in a network namespace
this module creates (tu-udp, joined to the host by a veth pair) and removes; the config's
checks of protocol and keys; answers that are not the protocol's, from a UDP echo on loopback."""

from __future__ import annotations

import hmac
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest
import trustme

from probe.cli import main
from probe.config import parse_config
from probe.measure.rounds import ProbeContext, path_rows, plan, run_loop, run_round
from probe.model import Measurement
from tests.servers import need, stop

NS, HOST_IF, NS_IF = "tu-udp", "tu-udp0", "eth0"
HOST_ADDR, NS_ADDR = "10.231.7.1", "10.231.7.2"  # nobody else's: the lab uses 10.66/10.99
WG_IF, WG_PORT, WG_CLOSED = "tu-udpwg", 51820, 51821
OVPN_PORT, OVPN_TLS_AUTH_PORT, OVPN_SHA256_PORT = 1194, 1195, 1196
ECHO = "127.0.7.9"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def _remove_namespace() -> None:
    if NS in sh("ip", "netns", "list").stdout.split():
        for pid in sh("ip", "netns", "pids", NS, check=False).stdout.split():
            sh("kill", "-9", pid, check=False)
        sh("ip", "netns", "del", NS, check=False)  # takes the veth pair with it
    sh("ip", "link", "del", HOST_IF, check=False)
    Path(f"/run/wireguard/{WG_IF}.sock").unlink(missing_ok=True)  # a killed wireguard-go's


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    need("ip")
    _remove_namespace()  # a killed run's leftovers
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF, "netns", NS)
        sh("ip", "addr", "add", f"{HOST_ADDR}/30", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        sh("ip", "-n", NS, "addr", "add", f"{NS_ADDR}/30", "dev", NS_IF)
        sh("ip", "-n", NS, "link", "set", NS_IF, "up")
        yield NS
    finally:
        _remove_namespace()


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            ["ip", "netns", "exec", NS, *args], stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def wg_key(tmp: Path, name: str) -> tuple[Path, str]:
    private = sh(need("wg"), "genkey").stdout
    (tmp / name).write_text(private)
    (tmp / name).chmod(0o600)
    public = subprocess.run([need("wg"), "pubkey"], input=private, capture_output=True, text=True, check=True)
    return tmp / name, public.stdout.strip()


class WireGuard:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.server_key, self.server_pub = wg_key(tmp, "server.key")
        self.probe_key, self.probe_pub = wg_key(tmp, "probe.key")
        self.stranger_key, _ = wg_key(tmp, "stranger.key")  # a peer the server does not list


@pytest.fixture(scope="module")
def wireguard(namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WireGuard]:
    """wireguard-go listening in the namespace, the probe peer listed with no allowed IPs."""
    tmp = tmp_path_factory.mktemp("wg")
    keys = WireGuard(tmp)
    proc = spawn([need("wireguard-go"), "-f", WG_IF], tmp / "wireguard-go.log")
    try:
        for _ in range(100):  # its control socket appears once the device is up
            if sh(need("wg"), "show", WG_IF, check=False).returncode == 0:
                break
            assert proc.poll() is None, (tmp / "wireguard-go.log").read_text()
            threading.Event().wait(0.05)
        sh(need("wg"), "set", WG_IF, "listen-port", str(WG_PORT), "private-key", str(keys.server_key))
        sh(need("wg"), "set", WG_IF, "peer", keys.probe_pub)
        sh("ip", "-n", NS, "link", "set", WG_IF, "up")
        yield keys
    finally:
        stop(proc)


def _pki(tmp: Path) -> dict[str, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("vpn.test")
    paths = {"ca": tmp / "ca.pem", "cert": tmp / "server.crt", "key": tmp / "server.key", "ta": tmp / "ta.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    paths["cert"].write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    sh(need("openvpn"), "--genkey", "secret", str(paths["ta"]))
    return paths


@pytest.fixture(scope="module")
def openvpn(namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Three OpenVPN servers in the namespace (a throwaway PKI): a multi-client one, plain; a
    point-to-point one with tls-auth (key direction 0); a multi-client one with tls-auth
    without a key direction and `auth SHA256` (2.6 answers it statelessly, an HMAC cookie)."""
    tmp = tmp_path_factory.mktemp("ovpn")
    pki = _pki(tmp)
    common = ["--proto", "udp", "--local", NS_ADDR, "--ca", str(pki["ca"]), "--cert", str(pki["cert"])]
    common += ["--key", str(pki["key"]), "--dh", "none", "--verb", "3"]
    plain = [need("openvpn"), "--server", "10.231.8.0", "255.255.255.0", "--topology", "subnet"]
    plain += ["--dev", "tu-udpvpn", "--dev-type", "tun", "--port", str(OVPN_PORT), *common]
    tls_auth = [need("openvpn"), "--tls-server", "--dev", "null", "--port", str(OVPN_TLS_AUTH_PORT), *common]
    sha256 = [need("openvpn"), "--server", "10.231.9.0", "255.255.255.0", "--topology", "subnet"]  # multi-client
    sha256 += ["--dev", "tu-udpvpn2", "--dev-type", "tun", "--port", str(OVPN_SHA256_PORT), *common]
    sha256 += ["--tls-auth", str(pki["ta"]), "--auth", "SHA256"]
    tls_auth += ["--tls-auth", str(pki["ta"]), "0"]
    procs = [spawn(plain, tmp / "plain.log"), spawn(tls_auth, tmp / "tls-auth.log"), spawn(sha256, tmp / "sha256.log")]
    try:
        for proc, log, line in ((procs[0], "plain.log", b"Initialization Sequence Completed"),
                                (procs[1], "tls-auth.log", b"link local (bound)"),
                                (procs[2], "sha256.log", b"Initialization Sequence Completed")):  # fmt: skip
            for _ in range(200):
                if line in (tmp / log).read_bytes():
                    break
                assert proc.poll() is None, (tmp / log).read_text()
                threading.Event().wait(0.05)
            else:
                raise RuntimeError(f"openvpn did not start: {(tmp / log).read_text()}")
        yield tmp
    finally:
        for proc in procs:
            stop(proc)


CONFIG = """
[vantage]
name = "v"
[probe]
timeout_s = {timeout}
[[targets]]
name = "t"
group = "control"
kind = "tcp"
host = "127.0.0.1"
port = 9
[[paths]]
name = "direct"
kind = "direct"
[[paths]]
name = "vpn"
kind = "socks5"
host = "127.0.0.1"
port = 1080
endpoint = {{ {endpoint} }}
"""


def endpoint_probe(endpoint: str, timeout_s: float = 3) -> Measurement:
    """The round's probe of path vpn's endpoint, as the daemon makes it."""
    config = parse_config(CONFIG.format(endpoint=endpoint, timeout=timeout_s), "test.toml")
    pairs = [(t, p) for t, p in plan(config) if t.group == "endpoint"]
    assert [(t.name, p.name) for t, p in pairs] == [("vpn-endpoint", "direct")]
    assert ("vpn", "socks5", "", "vpn-endpoint") in path_rows(config)
    measurements, _ = run_loop(run_round(ProbeContext.build(config), pairs))  # uvloop, as the daemon
    (m,) = measurements
    assert (m.target, m.group, m.path) == ("vpn-endpoint", "endpoint", "direct")
    return m


def wg_endpoint(keys: WireGuard, key: Path, port: int = WG_PORT, public: str | None = None) -> str:
    return (
        f'host = "{NS_ADDR}", port = {port}, transport = "udp", protocol = "wireguard", '
        f'private_key_file = "{key}", server_public_key = "{public or keys.server_pub}"'
    )


def test_wireguard_server_answers_the_listed_probe_peer(wireguard: WireGuard) -> None:
    m = endpoint_probe(wg_endpoint(wireguard, wireguard.probe_key))
    assert m.ok and m.failure is None, m
    assert m.kind == "wireguard" and m.input == f"{NS_ADDR}:{WG_PORT}" and m.peer_address == NS_ADDR
    assert m.first_byte_ms is not None and 0 < m.first_byte_ms <= m.total_ms
    # again: the server takes a second initiation from the peer (its timestamp is later)
    assert endpoint_probe(wg_endpoint(wireguard, wireguard.probe_key)).ok
    # the server took the initiation: the probe peer's endpoint is now the probe's address
    peers = [line.split("\t") for line in sh(need("wg"), "show", WG_IF, "dump").stdout.splitlines()[1:]]
    assert [peer[2].rpartition(":")[0] for peer in peers if peer[0] == wireguard.probe_pub] == [HOST_ADDR]


def test_wireguard_server_is_silent_to_an_earlier_timestamp(
    wireguard: WireGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why one probe key per vantage point: a clock behind the last initiation the server took."""
    assert endpoint_probe(wg_endpoint(wireguard, wireguard.probe_key)).ok
    day_ago = time.time_ns() - 86_400 * 10**9
    monkeypatch.setattr("probe.measure.udp_endpoint.time.time_ns", lambda: day_ago)
    m = endpoint_probe(wg_endpoint(wireguard, wireguard.probe_key), timeout_s=2.5)
    assert (m.ok, m.failure, m.failed_operation) == (False, "generic_timeout_error", "wireguard_handshake")


def test_wireguard_server_is_silent_to_an_unknown_peer(wireguard: WireGuard) -> None:
    m = endpoint_probe(wg_endpoint(wireguard, wireguard.stranger_key), timeout_s=2.5)
    assert not m.ok
    assert (m.failure, m.failed_operation) == ("generic_timeout_error", "wireguard_handshake")
    assert m.first_byte_ms is None


def test_wireguard_server_is_silent_to_a_probe_that_names_another_server_key(wireguard: WireGuard) -> None:
    _, someone_else = wg_key(wireguard.tmp, "other-server.key")
    m = endpoint_probe(wg_endpoint(wireguard, wireguard.probe_key, public=someone_else), timeout_s=2.5)
    assert (m.ok, m.failure) == (False, "generic_timeout_error")


def test_closed_wireguard_port_is_refused(wireguard: WireGuard) -> None:
    m = endpoint_probe(wg_endpoint(wireguard, wireguard.probe_key, port=WG_CLOSED))
    assert (m.ok, m.failure, m.failed_operation) == (False, "connection_refused", "wireguard_handshake")


def test_wireguard_port_dropped_by_a_firewall_times_out(wireguard: WireGuard) -> None:
    rule = ["INPUT", "-p", "udp", "--dport", str(WG_PORT), "-j", "DROP"]
    sh("ip", "netns", "exec", NS, "iptables", "-I", *rule)
    try:
        m = endpoint_probe(wg_endpoint(wireguard, wireguard.probe_key), timeout_s=2.5)
    finally:
        sh("ip", "netns", "exec", NS, "iptables", "-D", *rule)
    assert (m.ok, m.failure) == (False, "generic_timeout_error")
    assert endpoint_probe(wg_endpoint(wireguard, wireguard.probe_key)).ok  # and back once the rule is gone


@pytest.mark.parametrize(
    ("reject_with", "failure"),
    [
        ("icmp-port-unreachable", "connection_refused"),
        ("icmp-admin-prohibited", "host_unreachable"),  # a firewall's REJECT
        ("icmp-host-unreachable", "generic_timeout_error"),  # soft: Linux keeps it from a UDP socket
    ],
)
def test_wireguard_port_rejected_by_a_firewall(wireguard: WireGuard, reject_with: str, failure: str) -> None:
    rule = ["INPUT", "-p", "udp", "--dport", str(WG_PORT), "-j", "REJECT", "--reject-with", reject_with]
    sh("ip", "netns", "exec", NS, "iptables", "-I", *rule)
    try:
        m = endpoint_probe(wg_endpoint(wireguard, wireguard.probe_key), timeout_s=2.5)
    finally:
        sh("ip", "netns", "exec", NS, "iptables", "-D", *rule)
    assert (m.ok, m.failure, m.failed_operation) == (False, failure, "wireguard_handshake"), m


def test_openvpn_server_answers_the_hard_reset(openvpn: Path) -> None:
    m = endpoint_probe(f'host = "{NS_ADDR}", port = {OVPN_PORT}, transport = "udp", protocol = "openvpn"')
    assert m.ok and m.failure is None, m
    assert m.kind == "openvpn" and m.first_byte_ms is not None and 0 < m.first_byte_ms <= m.total_ms


def test_openvpn_server_with_tls_auth_is_silent(openvpn: Path) -> None:
    endpoint = f'host = "{NS_ADDR}", port = {OVPN_TLS_AUTH_PORT}, transport = "udp", protocol = "openvpn"'
    m = endpoint_probe(endpoint, timeout_s=2.5)
    assert (m.ok, m.failure, m.failed_operation) == (False, "generic_timeout_error", "openvpn_handshake")
    assert b"HMAC" in (openvpn / "tls-auth.log").read_bytes()  # it got the packet, and dropped it


def test_openvpn_server_with_tls_auth_answers_a_probe_given_its_key(openvpn: Path) -> None:
    endpoint = (
        f'host = "{NS_ADDR}", port = {OVPN_TLS_AUTH_PORT}, transport = "udp", protocol = "openvpn", '
        f'tls_auth_file = "{openvpn / "ta.key"}", tls_auth_direction = 1'
    )
    m = endpoint_probe(endpoint)
    assert m.ok and m.failure is None, m
    assert m.first_byte_ms is not None and 0 < m.first_byte_ms <= m.total_ms


def test_openvpn_server_with_bidirectional_tls_auth_and_sha256(openvpn: Path) -> None:
    endpoint = (
        f'host = "{NS_ADDR}", port = {OVPN_SHA256_PORT}, transport = "udp", protocol = "openvpn", '
        f'tls_auth_file = "{openvpn / "ta.key"}"'
    )
    m = endpoint_probe(endpoint + ', tls_auth_digest = "SHA256"')
    assert m.ok and m.failure is None, m
    # SHA1's HMAC, as the default digest: the server drops it
    m = endpoint_probe(endpoint, timeout_s=2.5)
    assert (m.ok, m.failure, m.failed_operation) == (False, "generic_timeout_error", "openvpn_handshake")


@pytest.mark.parametrize("wrong", ["tls_auth_direction = 0", "another key"])
def test_openvpn_server_with_tls_auth_is_silent_to_the_wrong_key(openvpn: Path, wrong: str) -> None:
    key = openvpn / "ta.key"
    if wrong == "another key":
        key = openvpn / "other-ta.key"
        sh(need("openvpn"), "--genkey", "secret", str(key))
    direction = "tls_auth_direction = 0" if wrong.startswith("tls_auth_direction") else "tls_auth_direction = 1"
    endpoint = (
        f'host = "{NS_ADDR}", port = {OVPN_TLS_AUTH_PORT}, transport = "udp", protocol = "openvpn", '
        f'tls_auth_file = "{key}", {direction}'
    )
    m = endpoint_probe(endpoint, timeout_s=2.5)
    assert (m.ok, m.failure, m.failed_operation) == (False, "generic_timeout_error", "openvpn_handshake")


def test_closed_openvpn_port_is_refused(namespace: str) -> None:
    m = endpoint_probe(f'host = "{NS_ADDR}", port = 1199, transport = "udp", protocol = "openvpn"')
    assert (m.ok, m.failure, m.failed_operation) == (False, "connection_refused", "openvpn_handshake")


@pytest.fixture
def echo() -> Iterator[int]:
    """A UDP port that sends every datagram back: something that answers, but not the protocol."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ECHO, 0))
    sock.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            sock.sendto(data, peer)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        done.set()
        thread.join()
        sock.close()


def test_an_echo_is_not_an_openvpn_server(echo: int) -> None:
    m = endpoint_probe(f'host = "{ECHO}", port = {echo}, transport = "udp", protocol = "openvpn"')
    assert (m.ok, m.failure, m.failed_operation) == (False, "protocol_error", "openvpn_handshake")
    assert "not an OpenVPN server's reset" in m.detail


def test_an_echo_is_not_a_wireguard_server(echo: int, tmp_path: Path) -> None:
    key = tmp_path / "probe.key"
    key.write_text("YNqHbfBQKaGvzefSSLXEoq1b8vmPsJEcwPADOsGBtWw=\n")
    endpoint = (
        f'host = "{ECHO}", port = {echo}, transport = "udp", protocol = "wireguard", '
        f'private_key_file = "{key}", server_public_key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="'
    )
    m = endpoint_probe(endpoint)
    assert (m.ok, m.failure, m.failed_operation) == (False, "protocol_error", "wireguard_handshake")
    assert "not a WireGuard response" in m.detail


# The config: protocol and keys checked at load, exit 2, the key and what is valid named.
PUBLIC = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
REFUSED = [
    ('host = "vpn.test", port = 1194, transport = "udp"', 'protocol = "openvpn" or "wireguard"'),
    ('host = "vpn.test", port = 1194, transport = "udp", protocol = "ipsec"', "'openvpn' or 'wireguard'"),
    ('host = "vpn.test", port = 443, protocol = "openvpn"', "protocol is for udp endpoints"),
    (
        'host = "vpn.test", port = 51820, transport = "udp", protocol = "wireguard"',
        "needs private_key_file (the probe peer's key",
    ),
    (
        f'host = "vpn.test", port = 51820, transport = "udp", protocol = "wireguard", server_public_key = "{PUBLIC}"',
        "needs private_key_file",
    ),
    (
        'host = "vpn.test", port = 51820, transport = "udp", protocol = "wireguard", '
        'private_key_file = "{tmp}/missing.key", server_public_key = "' + PUBLIC + '"',
        "missing.key': cannot read it: No such file or directory",
    ),
    (
        'host = "vpn.test", port = 51820, transport = "udp", protocol = "wireguard", '
        'private_key_file = "{tmp}/bad.key", server_public_key = "' + PUBLIC + '"',
        "bad.key' holds no WireGuard private key (44 characters of base64, as `wg genkey` prints)",
    ),
    (
        'host = "vpn.test", port = 51820, transport = "udp", protocol = "wireguard", '
        'private_key_file = "{tmp}/good.key", server_public_key = "not-a-key"',
        "is not a WireGuard public key",
    ),
    (  # a key's value is never echoed: a private key pasted there by mistake would be
        'host = "vpn.test", port = 51820, transport = "udp", protocol = "wireguard", '
        'private_key_file = "{tmp}/good.key", server_public_key = "this key must never be echoed"',
        "server_public_key: is not a WireGuard public key",
    ),
    (  # a low-order point (all zeros, a placeholder): no handshake can use it
        'host = "vpn.test", port = 51820, transport = "udp", protocol = "wireguard", '
        'private_key_file = "{tmp}/good.key", server_public_key = "' + "A" * 43 + '="',
        "is a low-order point, not a WireGuard server's public key",
    ),
    (
        'host = "vpn.test", port = 1194, transport = "udp", protocol = "openvpn", tls_auth_direction = 1',
        "tls_auth_direction and tls_auth_digest go with a tls_auth_file",
    ),
    (
        'host = "vpn.test", port = 1194, transport = "udp", protocol = "openvpn", tls_auth_digest = "SHA256"',
        "tls_auth_direction and tls_auth_digest go with a tls_auth_file",
    ),
    (
        'host = "vpn.test", port = 1194, transport = "udp", protocol = "openvpn", private_key_file = "{tmp}/good.key"',
        "private_key_file and server_public_key are for wireguard endpoints",
    ),
    (
        'host = "vpn.test", port = 1194, transport = "udp", protocol = "openvpn", tls_auth_file = "{tmp}/bad.key"',
        "bad.key' holds no OpenVPN static key (-----BEGIN OpenVPN Static key V1-----",
    ),
    (
        'host = "vpn.test", port = 1194, transport = "udp", protocol = "openvpn", tls_auth_file = "{tmp}/none.key"',
        "none.key': cannot read it: No such file or directory",
    ),
    (
        'host = "vpn.test", port = 1194, transport = "udp", protocol = "openvpn", tls_auth_file = "{tmp}/ta.key", '
        "tls_auth_direction = 2",
        "tls_auth_direction: Input should be 0 or 1",
    ),
    (
        'host = "vpn.test", port = 51820, transport = "udp", protocol = "wireguard", tls_auth_file = "{tmp}/ta.key", '
        f'private_key_file = "{{tmp}}/good.key", server_public_key = "{PUBLIC}"',
        "tls_auth_file is for openvpn endpoints",
    ),
]


@pytest.fixture
def check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[str], tuple[int, str]]]:
    """`tunnelwatch config check` in this process on a config whose vpn path has this endpoint."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    (tmp_path / "bad.key").write_text("this is not a key, and it must never be echoed\n")
    (tmp_path / "good.key").write_text("YNqHbfBQKaGvzefSSLXEoq1b8vmPsJEcwPADOsGBtWw=\n")
    sh(need("openvpn"), "--genkey", "secret", str(tmp_path / "ta.key"))

    def run(endpoint: str) -> tuple[int, str]:
        path = tmp_path / "tunnelwatch.toml"
        path.write_text(CONFIG.format(endpoint=endpoint.replace("{tmp}", str(tmp_path)), timeout=3))
        with pytest.raises(SystemExit) as exited:
            main(["config", "check", "--config", str(path)])
        return int(exited.value.code or 0), capsys.readouterr().err

    yield run
    root.handlers[:], root.level = handlers, level


@pytest.mark.parametrize(("endpoint", "message"), REFUSED, ids=[r[1][:30] for r in REFUSED])
def test_bad_udp_endpoint_is_refused_with_exit_2(
    check: Callable[[str], tuple[int, str]], endpoint: str, message: str
) -> None:
    code, err = check(endpoint)
    text = " ".join(err.split())
    assert code == 2, err
    assert "paths[1].endpoint" in text and message in text, text
    assert "never be echoed" not in text and "Traceback" not in text


def test_good_udp_endpoints_pass_the_check(check: Callable[[str], tuple[int, str]]) -> None:
    assert check('host = "vpn.test", port = 1194, transport = "udp", protocol = "openvpn"')[0] == 0
    wireguard = (
        'host = "vpn.test", port = 51820, transport = "udp", protocol = "wireguard", '
        f'private_key_file = "{{tmp}}/good.key", server_public_key = "{PUBLIC}"'
    )
    assert check(wireguard)[0] == 0
    tls_auth = 'host = "vpn.test", port = 1194, transport = "udp", protocol = "openvpn", tls_auth_file = "{tmp}/ta.key"'
    assert check(tls_auth)[0] == 0
    assert check(tls_auth + ', tls_auth_direction = 1, tls_auth_digest = "SHA256"')[0] == 0
    assert check('host = "vpn.test", port = 8388')[0] == 0  # tcp, as before


# Hostile answers: a responder on loopback that answers each datagram as `reply` says.
LIAR = "127.0.7.10"
PROBE_KEY = "YNqHbfBQKaGvzefSSLXEoq1b8vmPsJEcwPADOsGBtWw="


class Liar(Protocol):
    def __call__(self, reply: Callable[[bytes], list[bytes]], flood: bool = False) -> int: ...


@pytest.fixture
def liar() -> Iterator[Liar]:
    """start(reply, flood): a UDP port answering each datagram with reply(datagram); with
    flood, it then sends the last answer again at full speed until the test ends."""
    socks: list[socket.socket] = []
    threads: list[threading.Thread] = []
    done = threading.Event()

    def start(reply: Callable[[bytes], list[bytes]], flood: bool = False) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((LIAR, 0))
        sock.settimeout(0.05)
        socks.append(sock)

        def serve() -> None:
            last: tuple[bytes, tuple[str, int]] | None = None
            while not done.is_set():
                try:
                    data, peer = sock.recvfrom(4096)
                except (TimeoutError, BlockingIOError):
                    if flood and last:
                        sock.settimeout(0)  # from now on never waiting: answering at full speed
                        for _ in range(100):
                            try:
                                sock.sendto(*last)
                            except OSError:  # the probe's socket closed: ICMP refusals come back
                                pass
                    continue
                for answer in reply(data):
                    sock.sendto(answer, peer)
                    last = answer, peer

        threads.append(threading.Thread(target=serve))
        threads[-1].start()
        return int(sock.getsockname()[1])

    yield start
    done.set()
    for thread in threads:
        thread.join()
    for sock in socks:
        sock.close()


def wg_liar_endpoint(port: int, tmp: Path) -> str:
    key = tmp / "probe.key"
    key.write_text(PROBE_KEY + "\n")
    return (
        f'host = "{LIAR}", port = {port}, transport = "udp", protocol = "wireguard", '
        f'private_key_file = "{key}", server_public_key = "{PUBLIC}"'
    )


def wg_response(initiation: bytes, ephemeral: bytes) -> list[bytes]:
    """A response to `initiation` (its sender as receiver) whose crypto is not the server's."""
    return [b"\x02\x00\x00\x00" + os.urandom(4) + initiation[4:8] + ephemeral + os.urandom(16) + bytes(32)]


@pytest.mark.parametrize("ephemeral", ["low order", "random"])
def test_a_wireguard_response_that_does_not_decrypt_is_a_protocol_error(
    liar: Liar, ephemeral: str, tmp_path: Path
) -> None:
    # an all-zero ephemeral key is a low-order point: X25519 refuses it (ValueError), as it must
    key = bytes(32) if ephemeral == "low order" else bytes.fromhex("09") + bytes(31)
    m = endpoint_probe(wg_liar_endpoint(liar(lambda data: wg_response(data, key)), tmp_path))
    assert (m.ok, m.failure, m.failed_operation) == (False, "protocol_error", "wireguard_handshake"), m
    assert "the response does not decrypt" in m.detail


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda data: [b""], id="empty"),
        pytest.param(lambda data: [b"\x02"], id="one byte"),
        pytest.param(lambda data: [b"\x02\x00\x00\x00" + os.urandom(60_000)], id="huge"),
        pytest.param(lambda data: [b"\x03\x00\x00\x00" + os.urandom(60)], id="cookie reply for another"),
    ],
)
def test_garbage_from_a_wireguard_port_is_a_failure_string(
    liar: Liar, answer: Callable[[bytes], list[bytes]], tmp_path: Path
) -> None:
    m = endpoint_probe(wg_liar_endpoint(liar(answer), tmp_path), timeout_s=2)
    assert not m.ok and m.failure in ("protocol_error", "generic_timeout_error"), m
    assert m.failed_operation == "wireguard_handshake"


def test_a_flood_of_answers_to_someone_else_ends_at_the_timeout(liar: Liar, tmp_path: Path) -> None:
    def other(data: bytes) -> list[bytes]:  # a response and a cookie reply for another sender
        return [b"\x02\x00\x00\x00" + os.urandom(88), b"\x03\x00\x00\x00" + os.urandom(60)]

    m = endpoint_probe(wg_liar_endpoint(liar(other, True), tmp_path), timeout_s=2)
    assert (m.ok, m.failure) == (False, "generic_timeout_error"), m
    assert m.total_ms < 30_000  # ended by the measure's timeout, not by the flood stopping

    def no_acks(data: bytes) -> list[bytes]:  # a server reset that acknowledges nothing, forever
        return [bytes([8 << 3]) + os.urandom(8) + b"\x00" + bytes(4)]

    m = endpoint_probe(f'host = "{LIAR}", port = {liar(no_acks, True)}, transport = "udp", protocol = "openvpn"', 2)
    assert (m.ok, m.failure) == (False, "generic_timeout_error"), m


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda data: [b""], id="empty"),
        pytest.param(lambda data: [bytes([8 << 3])], id="one byte"),
        pytest.param(lambda data: [bytes([8 << 3]) + os.urandom(60_000)], id="huge"),
        pytest.param(lambda data: [bytes([5 << 3]) + os.urandom(8) + b"\x01" + bytes(4) + os.urandom(8)], id="ack"),
    ],
)
def test_garbage_from_an_openvpn_port_is_a_failure_string(liar: Liar, answer: Callable[[bytes], list[bytes]]) -> None:
    m = endpoint_probe(f'host = "{LIAR}", port = {liar(answer)}, transport = "udp", protocol = "openvpn"', 2)
    assert not m.ok and m.failure in ("protocol_error", "generic_timeout_error"), m
    assert m.failed_operation == "openvpn_handshake"


def test_openvpn_reset_with_tls_auth_is_laid_out_as_openvpn_writes_it(tmp_path: Path) -> None:
    """opcode 7 key id 0, session id, HMAC over packet id + time + opcode + session id + the
    rest, then the packet id before the time (src/openvpn/ssl_pkt.c swap_hmac, packet_id.c
    packet_id_write), then no acks and message packet id 0."""
    from probe.measure.udp_endpoint import TlsAuth, openvpn_reset

    auth = TlsAuth(bytes(range(64)), bytes(64), "sha1")
    before = int(time.time())
    packet = openvpn_reset(b"S" * 8, auth, packet_id=7)
    header, mac, packet_id, when, rest = packet[:9], packet[9:29], packet[29:33], packet[33:37], packet[37:]
    assert header == bytes([7 << 3]) + b"S" * 8 and rest == b"\x00" + bytes(4)
    assert int.from_bytes(packet_id, "big") == 7 and before <= int.from_bytes(when, "big") <= time.time() + 1
    assert mac == hmac.digest(bytes(range(20)), packet_id + when + header + rest, "sha1")
    assert auth.unwrap(header + hmac.digest(bytes(20), packet_id + when + header + rest, "sha1") + packet[29:]) == (
        header + rest
    )


def test_an_openvpn_reset_without_the_keys_hmac_is_a_protocol_error(liar: Liar, tmp_path: Path) -> None:
    sh(need("openvpn"), "--genkey", "secret", str(tmp_path / "ta.key"))

    def forged(data: bytes) -> list[bytes]:  # a server reset acking our packet, its HMAC random
        session = data[1:9]
        return [bytes([8 << 3]) + os.urandom(8) + os.urandom(20) + bytes(8) + b"\x01" + bytes(4) + session + bytes(4)]

    endpoint = (
        f'host = "{LIAR}", port = {liar(forged)}, transport = "udp", protocol = "openvpn", '
        f'tls_auth_file = "{tmp_path / "ta.key"}", tls_auth_direction = 1'
    )
    m = endpoint_probe(endpoint)
    assert (m.ok, m.failure, m.failed_operation) == (False, "protocol_error", "openvpn_handshake"), m
    assert "the answer's tls-auth HMAC is not the key's" in m.detail


def test_a_cookie_reply_to_our_initiation_counts_as_answered(liar: Liar, tmp_path: Path) -> None:
    """A server under load answers with a cookie reply (type 3, our sender index as receiver,
    a 24-byte nonce, a sealed 16-byte cookie): taken unverified, as the module says."""

    def cookie(data: bytes) -> list[bytes]:
        return [b"\x03\x00\x00\x00" + data[4:8] + os.urandom(56)]

    m = endpoint_probe(wg_liar_endpoint(liar(cookie), tmp_path))
    assert m.ok and m.failure is None, m
    # the same with a nonzero reserved byte is not a WireGuard message
    m = endpoint_probe(wg_liar_endpoint(liar(lambda data: [b"\x03\x00\x01\x00" + cookie(data)[0][4:]]), tmp_path))
    assert (m.ok, m.failure, m.failed_operation) == (False, "protocol_error", "wireguard_handshake"), m
