"""Every probe against real servers on loopback: what is stored for each success and failure."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe.config import Config, load_config
from probe.measure.rounds import ProbeContext, measure, plan, run_round
from probe.model import Measurement
from tests.conftest import (
    DNS,
    HOST,
    PAGE_TITLE,
    RESET_MARKER,
    Proxies,
    TLSFiles,
    write_config,
)
from tests.servers import IS_ROOT, LOOPBACK, Web, need


@pytest.fixture
def lab(
    tmp_path: Path,
    web: Web,
    dns: DNS,
    proxies: Proxies,
    tls_files: TLSFiles,
    silent_port: int,
    closed_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> Config:
    monkeypatch.setenv("TW_SOCKS_USER", proxies.user)
    monkeypatch.setenv("TW_SOCKS_PASS", proxies.password)
    site, ip_site = f"http://{HOST}:{web.http}", f"http://{LOOPBACK}:{web.http}"
    targets = {
        "page": ("http", f'url = "https://{HOST}:{web.https}/"\nexpect_title = "{PAGE_TITLE}"'),
        "page-ip": ("http", f'url = "https://{LOOPBACK}:{web.https}/"'),
        "plain": ("http", f'url = "{site}/"'),
        "redirect": ("http", f'url = "{site}/redirect"'),
        "loop": ("http", f'url = "{site}/loop"'),
        "bad-redirect": ("http", f'url = "{site}/bad-redirect"'),
        "missing": ("http", f'url = "{site}/missing"'),
        "expect-fails": ("http", f'url = "{site}/"\nexpect_body = "not on this page"'),
        "big": ("http", f'url = "{site}/big.html"'),
        "reset": ("http", f'url = "{site}/reset.html"'),
        "closes": ("http", f'url = "{site}/slow"'),
        "echo-ip": ("http", f'url = "{ip_site}/echo-ip"'),
        "nx": ("http", f'url = "http://nx.example.test:{web.http}/"'),
        "wrong-host": ("http", f'url = "https://{HOST}:{web.wrong_host}/"'),
        "unknown-ca": ("tls", f'host = "{HOST}"\nport = {web.unknown_ca}'),
        "expired": ("tls", f'host = "{HOST}"\nport = {web.expired}'),
        "tls-good": ("tls", f'host = "{HOST}"\nport = {web.https}'),
        "tcp-good": ("tcp", f'host = "{HOST}"\nport = {web.http}'),
        "refused": ("tcp", f'host = "{LOOPBACK}"\nport = {closed_port}'),
        "silent-http": ("http", f'url = "http://{LOOPBACK}:{silent_port}/"\ntimeout_s = 1'),
        "silent-tls": ("tls", f'host = "{LOOPBACK}"\nport = {silent_port}\nsni = "{HOST}"\ntimeout_s = 1'),
        "dns-good": ("dns", f'host = "{HOST}"'),
        "dns-nx": ("dns", 'host = "nx.example.test"'),
        "dns-sinkhole": ("dns", 'host = "sinkhole.example.test"\nqtypes = ["A"]'),
    }
    body = "".join(
        f'[[targets]]\nname = "{name}"\ngroup = "blocked"\nkind = "{kind}"\n{extra}\n\n'
        for name, (kind, extra) in targets.items()
    )
    resolver = f'resolver = ["{dns.server}"]'
    paths = {
        "direct": f'kind = "direct"\n{resolver}',
        "direct-servfail": f'kind = "direct"\nresolver = ["{LOOPBACK}:{dns.servfail_port}"]',
        "direct-refused": f'kind = "direct"\nresolver = ["{LOOPBACK}:{dns.refused_port}"]',
        "socks": f'kind = "socks5"\nhost = "{LOOPBACK}"\nport = {proxies.socks}\nremote_dns = false\n{resolver}',
        "socks-remote": f'kind = "socks5"\nhost = "{LOOPBACK}"\nport = {proxies.socks}',
        "socks-auth": f'kind = "socks5"\nhost = "{LOOPBACK}"\nport = {proxies.socks_auth}\nremote_dns = false\n'
        f'{resolver}\nusername = "${{TW_SOCKS_USER}}"\npassword = "${{TW_SOCKS_PASS}}"',
        "socks-badauth": f'kind = "socks5"\nhost = "{LOOPBACK}"\nport = {proxies.socks_auth}\n'
        'username = "${TW_SOCKS_USER}"\npassword = "wrong"',
        "socks-down": f'kind = "socks5"\nhost = "{LOOPBACK}"\nport = {closed_port}',
        "shadowsocks": f'kind = "socks5"\nlabel = "shadowsocks"\nhost = "{LOOPBACK}"\nport = {proxies.shadowsocks}\n'
        f"remote_dns = false\n{resolver}",
        "http-proxy": f'kind = "http"\nhost = "{LOOPBACK}"\nport = {proxies.http_connect}',
        "bind-lo2": f'kind = "bind"\naddress = "127.0.0.2"\n{resolver}',
        "bind-missing": f'kind = "bind"\naddress = "192.0.2.1"\n{resolver}',
        "bind-nodev": f'kind = "bind"\ninterface = "nosuchdev0"\n{resolver}',
    }
    body += "".join(f'[[paths]]\nname = "{name}"\n{spec}\n\n' for name, spec in paths.items())
    return load_config(write_config(tmp_path, body, tls_files.ca_file))


def run(cfg: Config, target: str, path: str) -> Measurement:
    return asyncio.run(measure(ProbeContext.build(cfg), cfg.target(target), cfg.path(path), "test-round"))


# (target, path, failure or None, failed operation)
CASES = [
    ("page", "direct", None, None),
    ("plain", "direct", None, None),
    ("redirect", "direct", None, None),
    ("tcp-good", "direct", None, None),
    ("page", "socks", None, None),
    ("page-ip", "socks-remote", None, None),
    ("page", "socks-auth", None, None),
    ("page", "shadowsocks", None, None),
    ("page-ip", "http-proxy", None, None),
    ("page", "bind-lo2", None, None),
    ("loop", "direct", "http_too_many_redirects", "http_round_trip"),
    ("bad-redirect", "direct", "http_invalid_redirect_location_host", "http_round_trip"),
    ("missing", "direct", "http_status_error", "http_round_trip"),
    ("expect-fails", "direct", "http_content_mismatch", "http_round_trip"),
    ("closes", "direct", "eof_error", "http_round_trip"),
    ("nx", "direct", "dns_nxdomain_error", "resolve"),
    ("plain", "direct-servfail", "dns_servfail_error", "resolve"),
    ("plain", "direct-refused", "dns_refused_error", "resolve"),
    ("wrong-host", "direct", "ssl_invalid_hostname", "tls_handshake"),
    ("unknown-ca", "direct", "ssl_unknown_authority", "tls_handshake"),
    ("expired", "direct", "ssl_invalid_certificate", "tls_handshake"),
    ("refused", "direct", "connection_refused", "connect"),
    ("refused", "socks-remote", "connection_refused", "connect"),
    ("silent-http", "direct", "generic_timeout_error", "http_round_trip"),
    ("silent-tls", "direct", "generic_timeout_error", "tls_handshake"),
    ("page", "socks-down", "connection_refused", "proxy_connect"),
    ("page", "socks-badauth", "proxy_auth_failed", "proxy_auth"),
    ("page", "bind-missing", "address_not_available", "bind"),
    ("page", "bind-nodev", "interface_not_found" if IS_ROOT else "operation_not_permitted", "bind"),
    ("dns-nx", "direct", "dns_nxdomain_error", "resolve"),
    ("dns-good", "direct-servfail", "dns_servfail_error", "resolve"),
]


@pytest.mark.parametrize(("target", "path", "failure", "operation"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_probe_outcome(lab: Config, target: str, path: str, failure: str | None, operation: str | None) -> None:
    m = run(lab, target, path)
    assert (m.failure, m.failed_operation) == (failure, operation), m.detail
    assert m.ok is (failure is None)
    assert m.total_ms is not None and m.total_ms > 0
    assert m.path_failed is (operation in ("bind", "proxy_connect", "proxy_auth"))
    if failure in ("ssl_invalid_hostname", "ssl_unknown_authority", "ssl_invalid_certificate"):
        assert m.tls_verified is False


def test_https_page_records_every_phase_and_the_page(lab: Config) -> None:
    m = run(lab, "page", "direct")
    assert m.ok, m.detail
    for phase in ("resolve_ms", "connect_ms", "tls_ms", "first_byte_ms", "total_ms"):
        assert getattr(m, phase) is not None and getattr(m, phase) >= 0, phase
    assert m.resolve_ms is not None and m.connect_ms is not None and m.total_ms is not None
    assert m.total_ms >= m.resolve_ms + m.connect_ms
    assert (m.status, m.title, m.addresses, m.peer_address) == (200, PAGE_TITLE, (LOOPBACK,), LOOPBACK)
    assert m.resolver == lab.path("direct").resolver[0]
    assert m.tls_version in ("TLSv1.2", "TLSv1.3") and m.tls_verified is True
    assert m.body_length and m.body_sha256 and len(m.body_sha256) == 64


def test_through_socks_the_proxy_phase_is_timed_apart(lab: Config) -> None:
    m = run(lab, "page", "socks-auth")
    assert m.ok, m.detail
    assert m.proxy_ms is not None and m.connect_ms is not None and m.tls_ms is not None
    assert m.first_byte_ms is not None


def test_redirect_is_followed_to_the_final_url(lab: Config, web: Web) -> None:
    m = run(lab, "redirect", "direct")
    assert (m.status, m.final_url) == (200, f"http://{HOST}:{web.http}/")


def test_body_is_read_up_to_the_cap(lab: Config) -> None:
    m = run(lab, "big", "direct")
    assert m.ok and m.body_length == lab.probe.body_cap_bytes
    assert m.title == PAGE_TITLE


def test_bind_path_leaves_from_its_address(lab: Config) -> None:
    m = run(lab, "echo-ip", "bind-lo2")
    direct = run(lab, "echo-ip", "direct")
    assert m.ok and direct.ok
    # nginx echoed the client address into the body; different bodies prove different sources
    assert m.body_length == len("127.0.0.2") and direct.body_length == len(LOOPBACK)


def test_tls_probe_records_the_certificate(lab: Config) -> None:
    m = run(lab, "tls-good", "direct")
    assert m.ok, m.detail
    assert m.cert_subject and HOST not in (m.cert_issuer or "")
    assert m.cert_issuer and "trustme" in m.cert_issuer.lower()
    assert m.cert_not_after is not None and m.cert_not_after.year >= 2026


def test_dns_probe_records_answers_and_rcode(lab: Config) -> None:
    good, nx = run(lab, "dns-good", "direct"), run(lab, "dns-nx", "direct")
    assert good.ok and good.addresses == (LOOPBACK,) and good.dns_rcode == "NOERROR"
    assert good.resolve_ms is not None
    assert nx.dns_rcode == "NXDOMAIN" and nx.addresses == ()
    sinkhole = run(lab, "dns-sinkhole", "direct")
    assert sinkhole.ok and sinkhole.addresses == ("10.10.34.35",)


def test_socks_remote_resolution_failure_is_the_targets(lab: Config) -> None:
    m = run(lab, "nx", "socks-remote")
    assert not m.ok and m.failed_operation == "connect" and not m.path_failed
    assert m.failure and not m.failure.startswith("unknown_failure")


@pytest.fixture
def reset_rule(web: Web) -> Iterator[None]:
    """iptables resets the client in the middle of a response, once the server has sent the
    marker, as a censor resets a flow on a keyword: the response packet carrying the marker
    marks the connection, and the client's next packet on it is answered with a RST."""
    if not IS_ROOT:
        pytest.skip("needs root for iptables")
    iptables = need("iptables")
    mark = [
        "OUTPUT",
        "-o",
        "lo",
        "-p",
        "tcp",
        "--sport",
        str(web.http),
        "-m",
        "string",
        "--string",
        RESET_MARKER,
        "--algo",
        "bm",
        "-j",
        "CONNMARK",
        "--set-mark",
        "0x7477",
    ]
    reset = [
        "OUTPUT",
        "-o",
        "lo",
        "-p",
        "tcp",
        "--dport",
        str(web.http),
        "-m",
        "connmark",
        "--mark",
        "0x7477",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ]
    subprocess.run([iptables, "-I", *mark], check=True)
    subprocess.run([iptables, "-I", *reset], check=True)
    try:
        yield
    finally:
        subprocess.run([iptables, "-D", *reset], check=False)
        subprocess.run([iptables, "-D", *mark], check=False)


def test_reset_in_the_middle_of_a_response(lab: Config, reset_rule: None) -> None:
    m = run(lab, "reset", "direct")
    assert (m.failure, m.failed_operation) == ("connection_reset", "http_round_trip"), m.detail
    assert m.first_byte_ms is not None  # the response had begun


def _silent_round(tmp_path: Path, silent_port: int, per_path: int) -> list[Measurement]:
    targets = "".join(
        f'[[targets]]\nname = "s{i}"\ngroup = "control"\nkind = "tls"\nhost = "{LOOPBACK}"\nport = {silent_port}\n'
        for i in range(3)
    )
    body = targets + '[[paths]]\nname = "direct"\nkind = "direct"\n'
    cfg = load_config(write_config(tmp_path, body, timeout_s=0.5))
    cfg = cfg.model_copy(update={"probe": cfg.probe.model_copy(update={"per_path_concurrency": per_path})})
    measurements, heartbeat = asyncio.run(run_round(ProbeContext.build(cfg), plan(cfg)))
    assert heartbeat.probes == 3 and heartbeat.succeeded == 0
    assert {m.failure for m in measurements} == {"generic_timeout_error"}
    return measurements


def test_per_path_concurrency_bounds_the_probes_in_flight(tmp_path: Path, silent_port: int) -> None:
    serial = sorted(m.started_at for m in _silent_round(tmp_path, silent_port, per_path=1))
    gaps = [(b - a).total_seconds() for a, b in zip(serial, serial[1:], strict=False)]
    assert all(gap >= 0.45 for gap in gaps), gaps  # each waited for the previous one's timeout
    parallel = sorted(m.started_at for m in _silent_round(tmp_path, silent_port, per_path=3))
    assert (parallel[-1] - parallel[0]).total_seconds() < 0.3


def test_the_system_resolver_reads_the_hosts_file_first(tmp_path: Path) -> None:
    from probe.measure.dns import hosts_file

    hosts = tmp_path / "hosts"
    hosts.write_text(
        "127.0.0.1 localhost\n# 10.0.0.9 commented.test\n10.1.2.3 intranet.test Intranet.alias\n::1 v6.test\n"
    )
    assert hosts_file("intranet.test", str(hosts)) == ["10.1.2.3"]
    assert hosts_file("INTRANET.ALIAS.", str(hosts)) == ["10.1.2.3"]
    assert hosts_file("v6.test", str(hosts)) == ["::1"]
    assert hosts_file("commented.test", str(hosts)) == []
    assert hosts_file("x.test", str(tmp_path / "missing")) == []


@pytest.mark.parametrize(
    ("target", "failure"),
    [
        ("unknown-ca", "ssl_unknown_authority"),
        ("expired", "ssl_invalid_certificate"),
        ("wrong-host", "ssl_invalid_hostname"),
    ],
)
def test_a_certificate_that_failed_verification_is_still_recorded(lab: Config, target: str, failure: str) -> None:
    m = run(lab, target, "direct")
    assert m.failure == failure and m.tls_verified is False
    assert m.cert_issuer and "trustme" in m.cert_issuer.lower()
    assert m.cert_subject is not None and m.cert_not_after is not None
    if target == "expired":
        assert m.cert_not_after < m.started_at
    if target == "unknown-ca":
        assert m.cert_issuer != run(lab, "tls-good", "direct").cert_issuer  # another CA signed it
