"""One message to one Apprise URL, and why it failed.

Apprise blocks (HTTP through `requests`, SMTP through `smtplib`), so the daemon calls
`deliver` in a thread of its own, or, with `alerts.via`, in a child process
(`python -m probe.daemon.delivery`) told to use the loopback proxy of probe/daemon/relay.py:
the proxy variables `requests` reads (HTTP_PROXY, HTTPS_PROXY) are process-wide, and the
daemon's own HTTP client must not see them. In that child SMTP connections are opened with a
CONNECT through the same proxy, so mailto:// leaves through the path too. Services that
speak neither HTTP nor SMTP (mqtt://, syslog://, xmpp-like ones) are not carried by the proxy.

Apprise's reason for a failure is in the log entries of its result; URLs may hold tokens
(Telegram's bot token is in the request path), so every reason is scrubbed of the URL's
secret parts before it is stored or logged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any
from urllib.parse import unquote, urlsplit

SEND_TIMEOUT_S = 60.0  # Apprise's limit for one message; the child gets a little longer
CHILD_GRACE_S = 30.0
RELAY_VARIABLE = "TUNNELWATCH_NOTIFY_PROXY"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
MAX_REASON = 500
_OS_ERROR = re.compile(r"\[Errno -?\d+\] [^\"')]+")
_SECRET_PART = re.compile(r"[^/:@?&=#+]{4,}")


def label(url: str) -> str:
    """A URL as it may be shown: Apprise's masked form (passwords and tokens hidden), its
    scheme and host only, '/...' for the rest."""
    import apprise

    _quiet_apprise()
    plugin = apprise.Apprise.instantiate(url)
    shown = urlsplit(url if plugin is None else plugin.url(privacy=True))  # type: ignore[no-untyped-call]
    host = shown.netloc if plugin is not None else (shown.hostname or "")
    given = urlsplit(url)
    rest = "/..." if (given.path.strip("/") or given.query) else ""
    return f"{shown.scheme}://{host}{rest}"


def scrub(text: str, url: str) -> str:
    """`text` without any part of `url` that its label does not show: passwords, tokens, and
    paths and queries, which may hold them (Telegram's bot token, a webhook's key)."""
    public = label(url)
    parts = set(_SECRET_PART.findall(url)) | set(_SECRET_PART.findall(unquote(url)))
    password = urlsplit(url).password
    if password and len(password) >= 2:
        parts.add(password)
    for secret in sorted(parts, key=len, reverse=True):
        if secret not in public:
            text = text.replace(secret, "***")
    return text


def _quiet_apprise() -> None:
    """Apprise's own log lines stay in its results (each attempt's reason): the daemon logs a
    failing destination once, not at every retry."""
    logger = logging.getLogger("apprise")
    if logger.propagate:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
        logger.setLevel(logging.DEBUG)  # the cause of a failure is a debug line


def deliver(url: str, title: str, body: str) -> tuple[bool, str]:
    """Send one message (blocking); whether it went, and Apprise's reason when it did not."""
    import apprise

    _quiet_apprise()
    sender = apprise.Apprise()
    if not sender.add(url):
        return False, "Apprise cannot read this URL"
    result = sender.notify(body=body, title=title, timeout=SEND_TIMEOUT_S, log_level=logging.DEBUG)
    if result:
        return True, ""
    if result.status == apprise.AppriseResultStatus.TIMEOUT:
        return False, f"no answer within {SEND_TIMEOUT_S:.0f} s"
    said = [e.message for s in result for e in s.logs() if e.level in ("WARNING", "ERROR", "CRITICAL")]
    said += [e.message for e in result.call_logs() if e.level in ("WARNING", "ERROR", "CRITICAL")]
    cause = [
        _cause(e.message)
        for s in result
        for e in s.logs()
        if e.message.startswith(("Socket Exception:", "Response Details:"))
    ]
    reason = "; ".join(dict.fromkeys([*said, *cause[-1:]])) or f"Apprise: {result.status.name.lower()}"
    return False, scrub(reason, url)[:MAX_REASON]


def _cause(message: str) -> str:
    """The gist of Apprise's debug line about a failure: the OS error deep in a requests
    exception, or the start of the answer."""
    if errors := _OS_ERROR.findall(message):
        return str(errors[-1])
    return " ".join(message.split())[:200]


async def send(url: str, title: str, body: str, executor: Executor, proxy: str | None) -> tuple[bool, str]:
    """`deliver` off the event loop: in `executor`'s thread, or through `proxy` (a
    ProxyRelay's URL) in a child process."""
    if proxy is None:
        return await asyncio.get_running_loop().run_in_executor(executor, deliver, url, title, body)
    return await _in_child(url, title, body, proxy)


def proxy_environment(proxy: str, base: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: every HTTP(S) request to the relay, none bypassing it."""
    env = {k: v for k, v in base.items() if k.upper() not in PROXY_VARIABLES}
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = env[name.lower()] = proxy
    env[RELAY_VARIABLE] = proxy
    return env


async def _in_child(url: str, title: str, body: str, proxy: str) -> tuple[bool, str]:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "probe.daemon.delivery",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=proxy_environment(proxy, os.environ),
    )
    message = json.dumps({"url": url, "title": title, "body": body}).encode()
    try:
        out, err = await asyncio.wait_for(child.communicate(message), SEND_TIMEOUT_S + CHILD_GRACE_S)
    except TimeoutError:
        child.kill()
        await child.wait()
        return False, f"the sender through the proxy gave no answer within {SEND_TIMEOUT_S + CHILD_GRACE_S:.0f} s"
    except BaseException:  # cancelled: the daemon is stopping
        if child.returncode is None:
            child.kill()
            await child.wait()
        raise
    try:
        answer: dict[str, Any] = json.loads(out)
        return bool(answer["sent"]), str(answer["reason"])
    except (ValueError, KeyError, TypeError):
        lines = err.decode(errors="replace").strip().splitlines()
        return False, scrub(f"the sender failed (exit {child.returncode}): {' | '.join(lines[-3:])}", url)


def _smtp_through(proxy: str) -> None:
    """smtplib's connections opened with a CONNECT through the HTTP proxy at `proxy` (a URL
    with the proxy's user and password)."""
    import smtplib

    relay = urlsplit(proxy)
    credentials = base64.b64encode(f"{unquote(relay.username or '')}:{unquote(relay.password or '')}".encode())

    def get_socket(self: smtplib.SMTP, to_host: str, to_port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((relay.hostname or "", relay.port or 80), timeout)
        try:
            target = f"[{to_host}]:{to_port}" if ":" in to_host else f"{to_host}:{to_port}"
            sock.sendall(
                f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n".encode()
                + b"Proxy-Authorization: Basic "
                + credentials
                + b"\r\n\r\n"
            )
            answer = b""
            while not answer.endswith(b"\r\n\r\n"):  # byte by byte: the server's greeting follows at once
                byte = sock.recv(1)
                if not byte:
                    raise OSError(f"the proxy closed the connection to {target}: {answer.decode(errors='replace')}")
                answer += byte
            status = answer.partition(b"\r\n")[0]
            if status.split(b" ")[1:2] != [b"200"]:
                why = sock.recv(4096).decode(errors="replace")  # the relay says why in a short body
                raise OSError(f"proxy: {status.decode(errors='replace')}: {why}")
            return sock
        except BaseException:
            sock.close()
            raise

    smtplib.SMTP._get_socket = get_socket  # type: ignore[attr-defined]  # SMTP_SSL wraps what it returns


def main() -> None:
    """The child: one message as JSON on stdin, the outcome as JSON on stdout."""
    if proxy := os.environ.get(RELAY_VARIABLE):
        _smtp_through(proxy)
    message = json.load(sys.stdin)
    sent, reason = deliver(message["url"], message["title"], message["body"])
    json.dump({"sent": sent, "reason": reason}, sys.stdout)


if __name__ == "__main__":
    main()
