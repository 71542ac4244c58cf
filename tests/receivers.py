"""Receivers of the daemon's notifications, started by the tests on loopback: an SMTP server
(aiosmtpd) and an HTTP server taking Apprise's JSON webhook (json://HOST:PORT/PATH). Each
records what it got and from which address, and can be stopped and started again on the same
port (a receiver that is down)."""

from __future__ import annotations

import email
import email.policy
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.servers import LOOPBACK, free_port


@dataclass(frozen=True)
class Received:
    peer: str  # the address the message came from
    title: str
    body: str


class _Receiver:
    host: str
    port: int

    def __init__(self) -> None:
        self.got: list[Received] = []
        self._lock = threading.Lock()

    def _record(self, message: Received) -> None:
        with self._lock:
            self.got.append(message)

    def messages(self) -> list[Received]:
        with self._lock:
            return list(self.got)

    def titles(self) -> list[str]:
        return [m.title for m in self.messages()]

    def wait_for(self, condition: Callable[[list[Received]], bool], timeout_s: float = 60, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition(self.messages()):
                return
            time.sleep(0.1)
        raise AssertionError(f"{type(self).__name__} on {self.port}: timed out waiting for {what}; got {self.got}")


class Webhook(_Receiver):
    """Apprise's JSON webhook: a POST of {"title", "message", "type", ...} to `path`."""

    def __init__(self, host: str = LOOPBACK, path: str = "/hook") -> None:
        super().__init__()
        self.host, self.port, self.path = host, free_port(), path
        self.rejected: list[str] = []  # requests to another path, or not JSON
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"json://{self.host}:{self.port}{self.path}"

    def start(self) -> Webhook:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", 0))
                data = self.rfile.read(length)
                try:
                    if self.path != receiver.path:
                        raise ValueError(self.path)
                    payload: dict[str, Any] = json.loads(data)
                    receiver._record(Received(self.client_address[0], payload["title"], payload["message"]))
                except (ValueError, KeyError) as exc:
                    receiver.rejected.append(f"{self.path}: {exc}")
                    self.send_response(404)
                else:
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Mailbox:
    def __init__(self, receiver: Mail) -> None:
        self.receiver = receiver

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 (aiosmtpd's name)
        raw = envelope.original_content or b""
        message = email.message_from_bytes(raw, policy=email.policy.default)
        body = message.get_body(("plain", "html"))
        text = body.get_content() if body is not None else ""  # type: ignore[union-attr]
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        self.receiver._record(Received(peer, str(message["subject"]), text))
        return "250 OK"


class Mail(_Receiver):
    """An SMTP server taking any mail, without TLS or authentication."""

    def __init__(self, host: str = LOOPBACK) -> None:
        super().__init__()
        self.host, self.port = host, free_port()
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"mailto://{self.host}:{self.port}?from=tunnelwatch@example.test&to=ops@example.test"

    def start(self) -> Mail:
        self._controller = Controller(_Mailbox(self), hostname=self.host, port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
