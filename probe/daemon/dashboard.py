"""The dashboard on the daemon's metrics listener (metrics.listen): /metrics is answered here
as before; every other path is forwarded to `tunnelwatch serve` (analysis/web/), a child
process on a unix socket of its own.

The pages are made in the child, so the daemon never loads pandas; the forwarding runs in
the metrics server's request threads, never on the event loop, and the child runs at a lower
CPU priority (nice 10), so a page never delays a probe. The child starts with the first page
asked for (a daemon nobody looks at pays nothing), is started again if it died, and stops
with the daemon.
"""

from __future__ import annotations

import http.client
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from probe.config import Config, loopback
from probe.daemon.jobs import TUNNELWATCH

log = logging.getLogger("tunnelwatch.daemon")
START_S = 60  # the child's start: it imports pandas and matplotlib
PAGE_S = 120  # a page over a year of data, the first time
NICE = 10  # the pages' analysis yields the CPU to the probing
METRICS = ("/metrics", "/metrics/")
# hop-by-hop headers (RFC 9110 7.6.1): never forwarded, and wsgiref refuses them in a response
HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-connection", "te", "trailer", "transfer-encoding"}
HOP |= {"upgrade"}
Environ = dict[str, Any]
StartResponse = Callable[..., Any]


class Dashboard:
    """`tunnelwatch serve --unix SOCKET` as a child, started when a page is first asked for."""

    def __init__(self, config: Config, config_path: Path | None, command: tuple[str, ...] = TUNNELWATCH) -> None:
        self._config_path = config_path
        self._command = command
        self._dir = Path(tempfile.mkdtemp(prefix="tunnelwatch-dashboard-"))  # 0700: only we reach the socket
        self._child: subprocess.Popen[bytes] | None = None
        self._socket = self._dir / "serve.sock"
        self._starts = 0
        self._lock = threading.Lock()
        host, _ = config.metrics.host_port
        if config.metrics.password is None and not loopback(host):
            log.warning(
                "the dashboard and metrics on %s have no password: anyone who reaches it reads the store; "
                "set metrics.username and metrics.password",
                config.metrics.listen,
            )

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def socket_path(self) -> Path:
        """The running child's socket, the child started (again) if need be; OSError if it
        does not answer within START_S."""
        with self._lock:
            if self._child is not None and self._child.poll() is None:
                return self._socket
            if self._child is not None:
                log.warning(
                    "the dashboard (tunnelwatch serve) exited with %s; starting it again", self._child.returncode
                )
            self._start()
            return self._socket

    def _start(self) -> None:
        self._starts += 1
        self._socket = self._dir / f"serve-{self._starts}.sock"
        command = ["nice", "-n", str(NICE), *self._command, "serve", "--unix", str(self._socket)]
        if self._config_path is not None:
            command += ["--config", str(self._config_path)]
        output = self._dir / "serve.log"
        with output.open("ab") as sink:
            self._child = subprocess.Popen(command, stdout=sink, stderr=sink, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline and self._child.poll() is None:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.connect(str(self._socket))
                return
            except OSError:
                time.sleep(0.1)
        last = output.read_text(errors="replace").strip().splitlines()[-3:]
        raise OSError(f"tunnelwatch serve did not answer in {START_S} s: {' | '.join(last) or 'no output'}")

    def close(self) -> None:
        with self._lock:
            if self._child is not None and self._child.poll() is None:
                self._child.terminate()
                try:
                    self._child.wait(10)
                except subprocess.TimeoutExpired:
                    self._child.kill()
                    self._child.wait()
            shutil.rmtree(self._dir, ignore_errors=True)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=PAGE_S)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))


def _forward(dashboard: Dashboard, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    target = quote(environ.get("PATH_INFO", "/").encode("latin-1"))  # WSGI's path: decoded, as latin-1
    if environ.get("QUERY_STRING"):
        target += "?" + environ["QUERY_STRING"]
    headers = {
        key[5:].replace("_", "-").title(): value
        for key, value in environ.items()
        if key.startswith("HTTP_") and key[5:].replace("_", "-").lower() not in HOP
    }
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").title()] = environ[key]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else None
    try:
        connection = _UnixConnection(dashboard.socket_path())
        try:
            connection.request(environ["REQUEST_METHOD"], target, body=body, headers=headers)
            answer = connection.getresponse()
            content = answer.read()
        finally:
            connection.close()
    except OSError as exc:
        log.warning("dashboard: %s %s: %s", environ["REQUEST_METHOD"], target, exc)
        start_response("503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"the dashboard is not available: {exc}\n".encode()]
    kept = [(k, v) for k, v in answer.getheaders() if k.lower() not in HOP]
    start_response(f"{answer.status} {answer.reason}", kept)
    return [content]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged (as prometheus_client's own server)."""


def listen(registry: CollectorRegistry, host: str, port: int, dashboard: Dashboard) -> WSGIServer:
    """The metrics listener, a thread per request: /metrics from `registry`, the rest forwarded."""
    metrics = make_wsgi_app(registry)

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") in METRICS:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        return _forward(dashboard, environ, start_response)

    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(str(address[0]), port, app, Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
