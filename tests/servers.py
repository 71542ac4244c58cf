"""Real servers from Debian packages, started on loopback for the tests and always stopped."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
IS_ROOT = os.geteuid() == 0


def shared_data() -> Path:
    """The project's shared real data (Google Trends, the ACSAC 2024 series): `../shared/data`
    beside the repository, as the README uses it, or where this workplace keeps it."""
    for place in (Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")):
        if (place / "gtrends_vpn_cn.csv").exists():
            return place
    raise FileNotFoundError("no shared data: expected ../shared/data beside the repository (or /work/shared/data)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def need(binary: str) -> str:
    """The binary's path; a missing one skips the test with the reason (the README's test
    command installs them all when run as root, so CI never skips)."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if not found:
        pytest.skip(f"{binary} is not installed (run the README's test command as root to install it)")
    return found


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {log.read_text(errors='replace')}")
        with socket.socket() as sock:
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"{proc.args[0]} did not listen on {port}: {log.read_text(errors='replace')}")


def wait_for_dns(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 10) -> None:
    """Until the resolver answers a query (any answer: REFUSED and SERVFAIL count)."""
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05probe\x04test\x00\x00\x01\x00\x01"
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {log.read_text(errors='replace')}")
            sock.sendto(query, (LOOPBACK, port))
            try:
                if sock.recv(512)[:2] == b"\x12\x34":
                    time.sleep(0.3)  # c-ares' first channel failed when asked at once; let it settle
                    return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} did not answer DNS on {port}: {log.read_text(errors='replace')}")


@contextmanager
def running(
    args: Sequence[str], log: Path, port: int | None = None, udp: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as sink:
        proc = subprocess.Popen(list(args), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if port is not None and udp:
            wait_for_dns(port, proc, log)
        elif port is not None:
            wait_for_port(port, proc, log)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@dataclass(frozen=True)
class Web:
    """nginx: one plain HTTP port and HTTPS ports with good and bad certificates."""

    http: int
    https: int
    wrong_host: int
    unknown_ca: int
    expired: int
    root: Path


NGINX_SITE = """
    location = /redirect {{ return 302 /; }}
    location = /loop {{ return 302 /loop; }}
    location = /bad-redirect {{ return 302 "http://[broken/"; }}
    location = /echo-ip {{ default_type text/plain; return 200 "$remote_addr"; }}
    location = /missing {{ return 404; }}
    location = /slow {{ return 444; }}
    location /gz/ {{ alias {root}/; gzip on; gzip_min_length 1; gzip_types text/html; }}
    location / {{ root {root}; index index.html; }}
"""


def nginx_config(tmp: Path, web: Web, certs: dict[str, tuple[Path, Path]]) -> str:
    site = NGINX_SITE.format(root=web.root)
    servers = [f"server {{ listen {LOOPBACK}:{web.http}; server_name _; {site} }}"]
    for port, name in (
        (web.https, "good"),
        (web.wrong_host, "wrong_host"),
        (web.unknown_ca, "unknown_ca"),
        (web.expired, "expired"),
    ):
        cert, key = certs[name]
        servers.append(
            f"server {{ listen {LOOPBACK}:{port} ssl; server_name _; "
            f"ssl_certificate {cert}; ssl_certificate_key {key}; {site} }}"
        )
    user = "user root;" if IS_ROOT else ""
    temp = " ".join(f"{kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""
{user}
daemon off;
worker_processes 1;
pid {tmp / "nginx.pid"};
error_log {tmp / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp / "access.log"};
    default_type text/html;
    {temp}
    {" ".join(servers)}
}}
"""
