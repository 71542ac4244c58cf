"""Fixtures that start real servers on loopback: nginx, dnsmasq, microsocks, shadowsocks-libev,
tinyproxy. Each is stopped when its scope ends, whatever the tests did."""

from __future__ import annotations

import datetime as dt
import socket
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme

from tests.servers import IS_ROOT, LOOPBACK, Web, free_port, need, nginx_config, running

if TYPE_CHECKING:
    from tests.daemonproc import Daemon

HOST = "www.example.test"
PAGE_TITLE = "Example Domain"
PAGE = (
    f"<!doctype html><html><head><title>{PAGE_TITLE}</title></head><body><p>tunnelwatch test page</p></body></html>\n"
)
RESET_MARKER = "TUNNELWATCH-RESET-HERE"


@dataclass(frozen=True)
class TLSFiles:
    ca_file: Path
    certs: dict[str, tuple[Path, Path]]


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    tmp = tmp_path_factory.mktemp("tls")
    ca, stranger = trustme.CA(), trustme.CA()
    now = dt.datetime.now(dt.UTC)
    issued = {
        "good": ca.issue_cert(HOST, "localhost", LOOPBACK),
        "wrong_host": ca.issue_cert("other.example.test"),
        "unknown_ca": stranger.issue_cert(HOST, LOOPBACK),
        "expired": ca.issue_cert(
            HOST, LOOPBACK, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        ),
    }
    certs = {}
    for name, leaf in issued.items():
        cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
        cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        certs[name] = (cert, key)
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return TLSFiles(ca_file=ca_file, certs=certs)


@pytest.fixture(scope="session")
def web(tmp_path_factory: pytest.TempPathFactory, tls_files: TLSFiles) -> Iterator[Web]:
    nginx = need("nginx")
    tmp = tmp_path_factory.mktemp("nginx")
    root = tmp / "www"
    root.mkdir()
    (root / "index.html").write_text(PAGE)
    (root / "big.html").write_text(PAGE + "x" * (400 * 1024))
    (root / "reset.html").write_text("a" * (64 * 1024) + RESET_MARKER + "b" * (1024 * 1024))
    site = Web(
        http=free_port(),
        https=free_port(),
        wrong_host=free_port(),
        unknown_ca=free_port(),
        expired=free_port(),
        root=root,
    )
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_config(tmp, site, tls_files.certs))
    with running([nginx, "-c", str(conf), "-p", str(tmp)], tmp / "stdout.log", site.expired):
        yield site


@dataclass(frozen=True)
class DNS:
    port: int  # answers www.example.test; NXDOMAIN for other names under example.test
    servfail_port: int  # a validating resolver whose upstream is unsigned: SERVFAIL
    refused_port: int  # no upstream at all: REFUSED

    @property
    def server(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def _dnsmasq(port: int, *options: str) -> list[str]:
    return [
        need("dnsmasq"),
        "--keep-in-foreground",
        f"--port={port}",
        f"--listen-address={LOOPBACK}",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--pid-file=",
        *options,
    ]


@pytest.fixture(scope="session")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DNS]:
    tmp = tmp_path_factory.mktemp("dnsmasq")
    servers = DNS(port=free_port(), servfail_port=free_port(), refused_port=free_port())
    main = _dnsmasq(
        servers.port,
        f"--address=/{HOST}/{LOOPBACK}",
        "--address=/sinkhole.example.test/10.10.34.35",
        "--local=/example.test/",
    )
    validating = _dnsmasq(
        servers.servfail_port,
        "--dnssec",
        "--trust-anchor=.,20326,8,2,E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D",
        "--dnssec-check-unsigned",
        f"--server={LOOPBACK}#{servers.port}",
    )
    refusing = _dnsmasq(servers.refused_port)
    with (
        running(main, tmp / "main.log", servers.port, udp=True),
        running(validating, tmp / "validating.log", servers.servfail_port, udp=True),
        running(refusing, tmp / "refusing.log", servers.refused_port, udp=True),
    ):
        yield servers


@dataclass(frozen=True)
class Proxies:
    socks: int
    socks_auth: int
    shadowsocks: int
    http_connect: int
    user: str = "tw-user"
    password: str = "tw-secret-pass"


@pytest.fixture(scope="session")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxies]:
    tmp = tmp_path_factory.mktemp("proxies")
    found = Proxies(socks=free_port(), socks_auth=free_port(), shadowsocks=free_port(), http_connect=free_port())
    microsocks = need("microsocks")
    ss_server, ss_local, tinyproxy = need("ss-server"), need("ss-local"), need("tinyproxy")
    ss_port = free_port()
    cipher = ["-k", "tw-ss-key", "-m", "chacha20-ietf-poly1305"]
    tinyproxy_conf = tmp / "tinyproxy.conf"
    tinyproxy_conf.write_text(
        f"Port {found.http_connect}\nListen {LOOPBACK}\nTimeout 30\nAllow 127.0.0.1\n"
        f"MaxClients 50\nLogLevel Info\n" + ("User root\nGroup root\n" if IS_ROOT else "")
    )
    with (
        running([microsocks, "-i", LOOPBACK, "-p", str(found.socks)], tmp / "socks.log", found.socks),
        running(
            [microsocks, "-i", LOOPBACK, "-p", str(found.socks_auth), "-u", found.user, "-P", found.password],
            tmp / "socks-auth.log",
            found.socks_auth,
        ),
        running([ss_server, "-s", LOOPBACK, "-p", str(ss_port), *cipher], tmp / "ss-server.log", ss_port),
        running(
            [ss_local, "-s", LOOPBACK, "-p", str(ss_port), "-b", LOOPBACK, "-l", str(found.shadowsocks), *cipher],
            tmp / "ss-local.log",
            found.shadowsocks,
        ),
        running([tinyproxy, "-d", "-c", str(tinyproxy_conf)], tmp / "tinyproxy.log", found.http_connect),
    ):
        yield found


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose kernel completes the TCP handshake but no program ever answers."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


@pytest.fixture
def closed_port() -> int:
    return free_port()


def write_config(tmp_path: Path, body: str, ca_file: Path | None = None, timeout_s: float = 5) -> Path:
    """A config file for one test: its own store, the test CA, and the given targets and paths."""
    ca = f'ca_file = "{ca_file}"' if ca_file else ""
    path = tmp_path / "tunnelwatch.toml"
    path.write_text(
        f"""
[vantage]
name = "test-vantage"
labels = {{ city = "Loopback" }}

[store]
path = "{tmp_path / "store.db"}"

[probe]
timeout_s = {timeout_s}
{ca}

[metrics]
listen = "{LOOPBACK}:{free_port()}"

{body}
"""
    )
    return path


@pytest.fixture
def config_file(tmp_path: Path, web: Web, dns: DNS, proxies: Proxies, tls_files: TLSFiles, closed_port: int) -> Path:
    """Two targets that work and one that is down, direct and through Shadowsocks."""
    body = f"""
[[targets]]
name = "page"
group = "blocked"
kind = "http"
url = "https://{HOST}:{web.https}/"
expect_title = "{PAGE_TITLE}"

[[targets]]
name = "control-page"
group = "control"
kind = "http"
url = "http://{HOST}:{web.http}/"

[[targets]]
name = "down"
group = "control"
kind = "tcp"
host = "{LOOPBACK}"
port = {closed_port}

[[paths]]
name = "direct"
kind = "direct"
resolver = ["{dns.server}"]

[[paths]]
name = "shadowsocks"
kind = "socks5"
label = "shadowsocks"
host = "{LOOPBACK}"
port = {proxies.shadowsocks}
remote_dns = false
resolver = ["{dns.server}"]
endpoint = {{ host = "{LOOPBACK}", port = {proxies.shadowsocks}, transport = "tcp" }}
"""
    return write_config(tmp_path, body, tls_files.ca_file)


def rows(db: Path, table: str = "measurements") -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(
            f"SELECT * FROM {table} ORDER BY id" if table == "measurements" else f"SELECT * FROM {table}"
        ).fetchall()
    finally:
        conn.close()


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    from tests.daemonproc import Daemon  # it imports this module

    started: list[Daemon] = []

    def start(config: Path, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(config, env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()
