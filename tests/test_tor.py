"""A socks5 path pointed at a real Tor's SocksPort, when Tor has no circuit (issue 19, "Tor").

The vantage point cannot bootstrap Tor without the real network, so the test runs Debian's `tor`
as a client whose only way out is a bridge on a closed loopback port: it answers SOCKS at once,
fails every circuit, and never sends a packet beyond loopback. (`DisableNetwork 1` is not used:
it closes the SocksPort too, so the probe would only see a refused proxy, not Tor's answer.)
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from analysis.verdicts import Evidence, decide
from probe.config import load_config
from tests.conftest import rows, write_config
from tests.servers import free_port, need, running

TUNNELWATCH = [sys.executable, "-m", "probe"]
TOR_ADDRESS = "127.0.9.50"
TARGET_HOST = "tor-target.test"  # remote_dns: only Tor would resolve it, through a circuit it never has


@dataclass(frozen=True)
class Tor:
    port: int
    socks_timeout_s: int
    log: Path


def _wait_for_socks(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 20) -> None:
    """Until Tor's SocksPort completes a SOCKS5 method negotiation."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tor exited with {proc.returncode}: {log.read_text(errors='replace')}")
        try:
            with socket.create_connection((TOR_ADDRESS, port), timeout=1) as sock:
                sock.sendall(b"\x05\x01\x00")
                if sock.recv(2) == b"\x05\x00":
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"tor did not answer SOCKS on {TOR_ADDRESS}:{port}: {log.read_text(errors='replace')}")


def _start_tor(tmp: Path, socks_timeout_s: int | None) -> Iterator[Tor]:
    tor = need("tor")
    data = tmp / "tor-data"
    data.mkdir(mode=0o700)
    port = free_port()
    with socket.socket() as sock:  # the bridge: a port nothing listens on, so every connection is refused
        sock.bind((TOR_ADDRESS, 0))
        bridge = int(sock.getsockname()[1])
    torrc = tmp / "torrc"
    lines = [
        f"DataDirectory {data}",
        f"SocksPort {TOR_ADDRESS}:{port}",
        "UseBridges 1",
        f"Bridge {TOR_ADDRESS}:{bridge}",
        "ReachableAddresses accept 127.0.0.0/8, reject *:*",  # belt and braces: loopback only
        "ClientUseIPv6 0",
        "ControlPort 0",
        "AvoidDiskWrites 1",
        "Log notice stdout",
    ]
    if socks_timeout_s is not None:
        lines.append(f"SocksTimeout {socks_timeout_s}")
    torrc.write_text("\n".join(lines) + "\n")
    log = tmp / "tor.log"
    with running([tor, "-f", str(torrc), "--defaults-torrc", "/dev/null"], log) as proc:
        _wait_for_socks(port, proc, log)
        yield Tor(port, socks_timeout_s or 120, log)


@pytest.fixture
def tor(tmp_path: Path) -> Iterator[Tor]:
    """Tor giving up on a stream after 2 s without a circuit (SocksTimeout 2)."""
    yield from _start_tor(tmp_path, 2)


@pytest.fixture
def tor_default(tmp_path: Path) -> Iterator[Tor]:
    """Tor as installed: it holds a stream 2 minutes waiting for a circuit."""
    yield from _start_tor(tmp_path, None)


def _config(tmp_path: Path, tor: Tor, timeout_s: float) -> Path:
    body = f"""
[[targets]]
name = "behind-tor"
group = "blocked"
kind = "http"
url = "http://{TARGET_HOST}/"

[[paths]]
name = "tor"
kind = "socks5"
label = "tor"
host = "{TOR_ADDRESS}"
port = {tor.port}
remote_dns = true
"""
    return write_config(tmp_path, body, timeout_s=timeout_s)


def _probe(config: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [*TUNNELWATCH, "probe", "--config", str(config), *extra], capture_output=True, text=True, timeout=60
    )
    return result, time.monotonic() - started


def test_tor_without_a_circuit_answers_ttl_expired_recorded_as_a_connect_timeout(tor: Tor, tmp_path: Path) -> None:
    timeout_s = 10.0
    config = _config(tmp_path, tor, timeout_s)
    result, elapsed = _probe(config, "--no-store", "--json")
    assert result.returncode == 1, result.stderr
    (line,) = result.stdout.splitlines()
    record = json.loads(line)
    assert (record["target"], record["path"], record["ok"]) == ("behind-tor", "tor", False)
    # Tor gives up after SocksTimeout with SOCKS5 reply 6 (TTL expired): the proxy handshake
    # worked, so the failure is the CONNECT request's, mapped like any SOCKS reply 6.
    assert (record["failure"], record["failed_operation"]) == ("generic_timeout_error", "connect")
    assert record["detail"] == f"ProbeFailure: SOCKS5 reply 6 for {TARGET_HOST}:80"
    assert record["proxy_ms"] is not None and record["connect_ms"] is None
    assert "Giving up. (waiting for circuit)" in tor.log.read_text(errors="replace")
    # Tor's answer, not the probe's own timeout, ended it (Tor polls its streams once a second).
    assert elapsed < timeout_s, elapsed
    assert not load_config(config).store.path.exists()


def test_default_tor_holds_the_stream_so_the_probe_timeout_ends_it(tor_default: Tor, tmp_path: Path) -> None:
    timeout_s = 3.0
    config = _config(tmp_path, tor_default, timeout_s)
    result, elapsed = _probe(config, "--no-store", "--json")
    assert result.returncode == 1, result.stderr
    record = json.loads(result.stdout)
    assert record["ok"] is False
    assert (record["failure"], record["failed_operation"]) == ("generic_timeout_error", "connect")
    assert elapsed < tor_default.socks_timeout_s / 2, elapsed  # not hanging for Tor's 2 minutes


def test_stored_round_and_its_verdict(tor: Tor, tmp_path: Path) -> None:
    config = _config(tmp_path, tor, 10.0)
    result, _ = _probe(config)
    assert result.returncode == 1, result.stderr
    (row,) = rows(load_config(config).store.path)
    assert (row["path"], row["ok"], row["failure"], row["failed_operation"]) == (
        "tor",
        0,
        "generic_timeout_error",
        "connect",
    )
    (beat,) = rows(load_config(config).store.path, "heartbeats")
    assert (beat["probes"], beat["succeeded"]) == (1, 0)
    evidence = Evidence(tunnel=True, ok=False, failure=row["failure"], failed_operation=row["failed_operation"])
    # Tor's "no circuit" reply comes after the proxy handshake, so it is not the tunnel's own
    # step (bind, proxy_connect, proxy_auth): alone it is inconclusive ...
    assert decide(evidence)[:2] == ("inconclusive", "inconclusive")
    # ... and beside a direct path that reached the site it reads as blocked behind the tunnel.
    beside_direct = Evidence(
        tunnel=True, ok=False, failure=row["failure"], failed_operation=row["failed_operation"], other_ok=True
    )
    assert decide(beside_direct)[:2] == ("blocked", "blocked-behind-tunnel")
    # Tor down altogether (nothing on the SocksPort) is the tunnel's own step.
    refused = Evidence(tunnel=True, ok=False, failure="connection_refused", failed_operation="proxy_connect")
    assert decide(refused)[:2] == ("tunnel_down", "tunnel-own-step")
