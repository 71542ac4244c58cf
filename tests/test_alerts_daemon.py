"""Alerts end to end: the daemon (a real `tunnelwatch run`) probes nginx directly and through
a microsocks tunnel, the tunnel is stopped for a while, and real receivers (an SMTP server
and a JSON webhook, tests/receivers.py) must each get one "down" and one "back" message, in
order, also when they were down meanwhile, through `alerts.via` when it is set, and never a
second "down" from a daemon restarted during the outage. Plus `tunnelwatch alerts test` and
bad alert settings."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from probe.config import Config, load_config
from probe.daemon.evaluations import Evaluations
from probe.daemon.jobs import ChildJobs
from probe.daemon.metrics import Metrics
from probe.daemon.notifier import Notifier
from probe.daemon.relay import ProxyRelay
from probe.store.outbox import destination_id, enqueue
from probe.store.sqlite import SQLiteStore
from tests.conftest import write_config
from tests.daemonproc import TUNNELWATCH, Daemon, scrape
from tests.receivers import Mail, Received, Webhook
from tests.servers import LOOPBACK, Web, free_port, need, running

DOWN = re.compile(r"^tunnelwatch test-vantage: \d+ down$")
BACK = re.compile(r"^tunnelwatch test-vantage: \d+ back$")
EXIT_ADDRESS = "127.0.0.77"  # the via tunnel's microsocks connects out from here


class Socks:
    """A microsocks on loopback that a test stops and starts again on the same port."""

    def __init__(self, tmp: Path, bind: str | None = None) -> None:
        self.port = free_port()
        self._args = [need("microsocks"), "-i", LOOPBACK, "-p", str(self.port), *(["-b", bind] if bind else [])]
        self._log = tmp / f"microsocks-{self.port}.log"
        self._stack: ExitStack | None = None

    def start(self) -> Socks:
        self._stack = ExitStack()
        self._stack.enter_context(running(self._args, self._log, self.port))
        return self

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None


@pytest.fixture
def socks(tmp_path: Path) -> Iterator[Callable[..., Socks]]:
    started: list[Socks] = []

    def start(bind: str | None = None) -> Socks:
        proxy = Socks(tmp_path, bind).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def receivers() -> Iterator[tuple[Webhook, Mail]]:
    hook, mail = Webhook().start(), Mail().start()
    yield hook, mail
    hook.stop()
    mail.stop()


def alerts_config(tmp_path: Path, web: Web, tunnel: Socks, urls: list[str], extra: str = "") -> Path:
    """Two targets on nginx, probed every 2 s directly and through the `tunnel` microsocks."""
    quoted = ", ".join(f'"{u}"' for u in urls)
    body = f"""
[analysis]
open_after = 2
close_after = 2

[alerts]
urls = [{quoted}]
retry_s = 1
retry_max_s = 2
{extra}

[[targets]]
name = "site"
group = "blocked"
kind = "http"
url = "http://{LOOPBACK}:{web.http}/"

[[targets]]
name = "control-site"
group = "control"
kind = "http"
url = "http://{LOOPBACK}:{web.http}/"

[[paths]]
name = "direct"
kind = "direct"

[[paths]]
name = "tunnel"
kind = "socks5"
host = "{LOOPBACK}"
port = {tunnel.port}
"""
    config = write_config(tmp_path, body)
    config.write_text(config.read_text().replace("[probe]", "[probe]\ninterval_s = 2"))
    return config


def evaluated_ms(daemon: Daemon) -> int:
    try:
        conn = sqlite3.connect(daemon.db)
        try:
            row = conn.execute("SELECT evaluated_ms FROM alerts_cursor").fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError:  # no store or no table yet
        return 0
    return 0 if row is None else int(row[0])


def evaluated_after(daemon: Daemon, seconds: float, timeout_s: float = 120) -> None:
    """Until an evaluation has judged the rounds up to `seconds` from now."""
    until = (time.time() + seconds) * 1000
    daemon.wait_until(lambda: evaluated_ms(daemon) > until, timeout_s, f"an evaluation {seconds} s from now")


def outbox(daemon: Daemon) -> list[tuple[object, ...]]:
    """The notifications table, for a failure's message."""
    conn = sqlite3.connect(daemon.db)
    try:
        return conn.execute("SELECT * FROM notifications ORDER BY id").fetchall()
    finally:
        conn.close()


def alerts(daemon: Daemon) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(daemon.db)
    try:
        return conn.execute("SELECT * FROM alerts ORDER BY id").fetchall()
    finally:
        conn.close()


def told(daemon: Daemon, receiver: Webhook | Mail, condition: Callable[[list[Received]], bool], what: str) -> None:
    """Until the receiver got what `condition` wants (the daemon's log, alerts and outbox if never)."""
    try:
        receiver.wait_for(condition, 120, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nalerts: {alerts(daemon)}\noutbox: {outbox(daemon)}\n{daemon.output()}") from None


def downs(got: list[Received]) -> list[Received]:
    return [m for m in got if DOWN.match(m.title)]


def backs(got: list[Received]) -> list[Received]:
    return [m for m in got if BACK.match(m.title)]


def assert_told_once(got: list[Received], peer: str = LOOPBACK) -> None:
    """One "down" then one "back", both about the tunnel being down, from `peer`."""
    assert [bool(DOWN.match(m.title)) for m in got] == [True, False], got
    down, back = got
    assert BACK.match(back.title), got
    assert down.body.startswith("tunnel DOWN since ") and ": tunnel_down (" in down.body, down.body
    assert "2 targets: control-site, site" in down.body, down.body
    assert back.body.startswith("tunnel back after ") and "(tunnel_down, down since " in back.body, back.body
    assert {m.peer for m in got} == {peer}, got


def test_an_outage_is_told_once_down_and_once_back_across_a_restart(
    tmp_path: Path,
    web: Web,
    socks: Callable[..., Socks],
    receivers: tuple[Webhook, Mail],
    daemons: Callable[..., Daemon],
) -> None:
    hook, mail = receivers
    tunnel = socks()
    config = alerts_config(tmp_path, web, tunnel, [hook.url, mail.url])
    daemon = daemons(config)
    evaluated_after(daemon, 6)  # a clean start: rounds judged, nothing to tell
    assert hook.messages() == [] and mail.messages() == []

    tunnel.stop()  # the outage
    for receiver in receivers:
        told(daemon, receiver, lambda got: len(downs(got)) == 1, "the down message")
    assert daemon.stop() == 0, daemon.output()
    daemon = daemons(config)  # restarted while the outage is open
    evaluated_after(daemon, 8)
    assert [len(r.messages()) for r in receivers] == [1, 1], daemon.output()

    tunnel.start()  # over
    for receiver in receivers:
        told(daemon, receiver, lambda got: len(backs(got)) == 1, "the back message")
    evaluated_after(daemon, 10)  # a clean period after it: nothing more
    for receiver in receivers:
        assert_told_once(receiver.messages())
    metrics = scrape(config)
    assert metrics[("tunnelwatch_notifications_sent_total", ())] == 2  # this daemon's: the two "back"
    assert metrics[("tunnelwatch_notifications_failed_total", ())] == 0
    assert metrics[("tunnelwatch_notifications_pending", ())] == 0
    assert metrics[("tunnelwatch_alerts_open", ())] == 0
    assert daemon.stop() == 0, daemon.output()
    assert "Traceback" not in daemon.output() and "ERROR" not in daemon.output(), daemon.output()


def test_a_receiver_down_meanwhile_gets_every_message_in_order_through_via(
    tmp_path: Path,
    web: Web,
    socks: Callable[..., Socks],
    receivers: tuple[Webhook, Mail],
    daemons: Callable[..., Daemon],
) -> None:
    """alerts.via = a second tunnel whose microsocks connects out from EXIT_ADDRESS: the
    receivers see the messages come from there. The webhook is down for the whole outage."""
    hook, mail = receivers
    tunnel, exit_tunnel = socks(), socks(EXIT_ADDRESS)
    extra = 'via = "exit"\n'
    config = alerts_config(tmp_path, web, tunnel, [hook.url, mail.url], extra)
    config.write_text(
        config.read_text()
        + f'\n[[paths]]\nname = "exit"\nkind = "socks5"\nhost = "{LOOPBACK}"\nport = {exit_tunnel.port}\n'
    )
    daemon = daemons(config)
    evaluated_after(daemon, 4)
    hook.stop()

    tunnel.stop()
    told(daemon, mail, lambda got: len(downs(got)) == 1, "the down message")
    daemon.wait_until(lambda: "notification to json://" in daemon.output(), 120, "the failure logged")
    tunnel.start()
    told(daemon, mail, lambda got: len(backs(got)) == 1, "the back message")
    daemon.wait_until(lambda: scrape(config)[("tunnelwatch_notifications_failed_total", ())] >= 3, 120, "retries")
    daemon.wait_until(  # the webhook's two wait; the mail's are sent (marked just after the receiver got them)
        lambda: scrape(config)[("tunnelwatch_notifications_pending", ())] == 2, 30, f"2 pending: {outbox(daemon)}"
    )
    assert hook.messages() == []

    hook.start()  # back: both messages, down first
    told(daemon, hook, lambda got: len(got) == 2, "both messages after the webhook is back")
    evaluated_after(daemon, 6)
    assert_told_once(hook.messages(), EXIT_ADDRESS)
    assert_told_once(mail.messages(), EXIT_ADDRESS)
    assert hook.rejected == []
    metrics = scrape(config)
    assert metrics[("tunnelwatch_notifications_sent_total", ())] == 4
    assert metrics[("tunnelwatch_notifications_pending", ())] == 0
    assert daemon.stop() == 0, daemon.output()
    log = daemon.output()
    assert log.count("notification to json://") == 1, log  # once per failing streak
    assert log.count("sent again, after") == 1, log
    assert f"json://{LOOPBACK}:{hook.port}/..." in log and "/hook" not in log, log  # the URL masked


def alerts_test(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TUNNELWATCH, "alerts", "test", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_alerts_test_sends_to_every_url_and_names_the_one_that_failed(
    tmp_path: Path, web: Web, socks: Callable[..., Socks], receivers: tuple[Webhook, Mail]
) -> None:
    hook, mail = receivers
    config = alerts_config(tmp_path, web, socks(), [hook.url, mail.url])
    done = alerts_test(config)
    assert done.returncode == 0, done.stdout + done.stderr
    for receiver in receivers:
        assert receiver.titles() == ["tunnelwatch test-vantage: test"]
    assert f"sent  json://{LOOPBACK}:{hook.port}/..." in done.stdout
    assert f"sent  mailto://{LOOPBACK}:{mail.port}/..." in done.stdout

    hook.stop()
    done = alerts_test(config)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"failed  json://{LOOPBACK}:{hook.port}/...: " in done.stdout, done.stdout
    assert "Connection refused" in done.stdout, done.stdout  # Apprise's reason
    assert f"sent  mailto://{LOOPBACK}:{mail.port}/..." in done.stdout
    assert len(mail.messages()) == 2 and "Traceback" not in done.stderr


SECRET = "not-a-bot-token-s3cr3t"


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("foo://x", "Apprise cannot read this foo:// URL"),
        ("json://tw:${TW_TEST_MISSING}@127.0.0.1:9/hook", "environment variable TW_TEST_MISSING is not set"),
        ("tgram://${TW_TEST_TOKEN}/12345", "Apprise cannot read this tgram:// URL"),
        (  # a misspelt scheme, the secret in the path and the query: Apprise's own log of it is muted
            "tgarm://hooks.example/${TW_TEST_TOKEN}?token=${TW_TEST_TOKEN}",
            "Apprise cannot read this tgarm:// URL",
        ),
    ],
)
def test_bad_alert_urls_are_refused_naming_the_key_without_the_secret(
    tmp_path: Path, web: Web, socks: Callable[..., Socks], url: str, said: str
) -> None:
    config = alerts_config(tmp_path, web, socks(), [url])
    env = {**os.environ, "TW_TEST_TOKEN": SECRET}
    env.pop("TW_TEST_MISSING", None)
    for command in (["alerts", "test"], ["run"], ["config", "check"]):
        done = subprocess.run(
            [*TUNNELWATCH, *command, "--config", str(config)], capture_output=True, text=True, timeout=60, env=env
        )
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "alerts.urls" in done.stderr and said in done.stderr, (command, done.stderr)
        assert "Traceback" not in done.stderr and SECRET not in done.stdout + done.stderr, done.stderr
        assert "hooks.example" not in done.stderr and "Unparseable" not in done.stderr, done.stderr  # no URL echoed


def notifier_config(tmp_path: Path, urls: list[str]) -> Config:
    quoted = ", ".join(f'"{u}"' for u in urls)
    body = f"""
[alerts]
urls = [{quoted}]
retry_s = 1
retry_max_s = 2

[[targets]]
name = "t"
group = "control"
kind = "tcp"
host = "{LOOPBACK}"
port = 9

[[paths]]
name = "direct"
kind = "direct"
"""
    config = load_config(write_config(tmp_path, body))
    SQLiteStore(config.store.path).close()  # the schema, with the outbox
    return config


def queue(config: Config, title: str, urls: list[str]) -> None:
    with sqlite3.connect(config.store.path) as conn:
        enqueue(conn, title, f"{title}: body", [destination_id(u) for u in urls], round(time.time() * 1000))


def rows_of(config: Config, url: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(config.store.path)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(
            "SELECT * FROM notifications WHERE destination = ? ORDER BY id", [destination_id(url)]
        ).fetchall()
    finally:
        conn.close()


def test_the_notifier_sends_in_order_retries_and_drops_what_has_no_destination(
    tmp_path: Path, receivers: tuple[Webhook, Mail], silent_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """In process: a webhook that is down, one that never answers and the mail server.
    The mail gets its messages at once, whatever the others do; the down webhook's first
    message is retried with back-off (kept in its row), and both arrive in order once it is
    back; a message for a URL no longer configured is dropped and counted, one queued since
    the notifier read its config is kept (its URL may come with the next reload)."""
    hook, mail = receivers
    hanging = f"json://{LOOPBACK}:{silent_port}/hook?rto=60"
    config = notifier_config(tmp_path, [hook.url, hanging, mail.url])
    hook.stop()
    queue(config, "first", [hook.url, hanging, mail.url, "json://127.0.0.1:9/gone"])
    queue(config, "second", [hook.url, hanging, mail.url])
    metrics = Metrics()

    async def scenario() -> None:
        notifier = Notifier(config, metrics)
        task = asyncio.create_task(notifier.run())
        try:
            await until(lambda: mail.titles() == ["first", "second"], "the mail, while the others fail or hang")
            assert rows_of(config, hanging)[0]["attempts"] == 0  # still hanging, holding up no one
            await until(lambda: rows_of(config, hook.url)[0]["attempts"] >= 3, "three failed attempts")
            first, second = rows_of(config, hook.url)
            assert "Connection refused" in first["error"], first["error"]
            assert first["next_try_ms"] <= time.time() * 1000 + 2000 + 500  # retry_max_s, not doubled on
            assert second["attempts"] == 0 and second["sent_ms"] is None  # waits behind the first
            assert metrics.notifications_pending._value.get() == 4  # type: ignore[attr-defined]
            hook.start()
            queue(config, "late", ["json://127.0.0.1:9/not-yet"])  # the config file changed, not reloaded yet
            notifier.wake()
            await until(lambda: hook.titles() == ["first", "second"], "both, in order, once the webhook is back")
            await until(lambda: "not in this daemon's alerts.urls" in caplog.text, "the stranger said")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await notifier.close()

    asyncio.run(scenario())
    destinations = [row["destination"] for row in all_rows(config)]
    assert destination_id("json://127.0.0.1:9/gone") not in destinations
    assert destination_id("json://127.0.0.1:9/not-yet") in destinations  # kept for the reload
    assert metrics.notifications_dropped._value.get() == 1  # type: ignore[attr-defined]
    assert metrics.notifications_sent._value.get() == 4  # type: ignore[attr-defined]
    assert metrics.notifications_failed._value.get() >= 3  # type: ignore[attr-defined]


def all_rows(config: Config) -> list[sqlite3.Row]:
    conn = sqlite3.connect(config.store.path)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM notifications").fetchall()
    finally:
        conn.close()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def test_the_relay_carries_only_requests_with_its_password(tmp_path: Path, receivers: tuple[Webhook, Mail]) -> None:
    """alerts.via's loopback proxy: another program on the machine cannot use it."""
    hook, _ = receivers
    config = notifier_config(tmp_path, [hook.url])

    async def ask(proxy_url: str | None, relay: ProxyRelay) -> bytes:
        port = int(relay.proxy_url.rpartition(":")[2])
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        auth = b""
        if proxy_url is not None:
            parts = urlsplit(proxy_url)
            auth = b"Proxy-Authorization: Basic " + base64.b64encode(f"{parts.username}:{parts.password}".encode())
            auth += b"\r\n"
        writer.write(f"CONNECT {LOOPBACK}:{hook.port} HTTP/1.1\r\nHost: x\r\n".encode() + auth + b"\r\n")
        answer = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        return answer.partition(b"\r\n")[0]

    async def scenario() -> tuple[bytes, bytes, bytes]:
        relay = ProxyRelay(config.path("direct"))
        url = await relay.start()
        try:
            wrong = url.replace(urlsplit(url).password or "", "guessed")
            return await ask(None, relay), await ask(wrong, relay), await ask(url, relay)
        finally:
            await relay.close()

    none, wrong, right = asyncio.run(scenario())
    assert none == wrong == b"HTTP/1.1 407 Proxy Authentication Required"
    assert right == b"HTTP/1.1 200 Connection established"


def test_evaluations_run_one_at_a_time_and_rounds_meanwhile_make_one_more(tmp_path: Path) -> None:
    """The evaluation is a child process (here a shell that notes its start and takes 2 s,
    longer than the 1 s interval): five rounds stored while one runs make one more run, not
    five; the notifier is woken after each."""
    config = notifier_config(tmp_path, [])
    config = config.model_copy(update={"probe": config.probe.model_copy(update={"interval_s": 1})})
    started = tmp_path / "started"
    jobs = ChildJobs(None, ("sh", "-c", f'echo "$1 $2" >> {started}; sleep 2', "sh"))
    woken: list[float] = []

    async def scenario() -> None:
        evaluations = Evaluations(config, jobs, lambda: woken.append(time.monotonic()))
        task = asyncio.create_task(evaluations.run())
        try:
            evaluations.round_stored()
            await until(lambda: started.exists(), "the first evaluation to start")
            for _ in range(5):
                evaluations.round_stored()
            await until(lambda: len(woken) == 2, "two evaluations")
            await asyncio.sleep(3)  # would-be extra runs have had their time
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert started.read_text().splitlines() == ["alerts evaluate", "alerts evaluate"]
    assert len(woken) == 2


def test_with_group_s_the_daemon_evaluates_on_its_clock_not_after_each_round(
    tmp_path: Path, web: Web, socks: Callable[..., Socks], daemons: Callable[..., Daemon]
) -> None:
    """At a 60 s interval the rounds come once at start: after each round means one
    evaluation; alerts.group_s = 2 means one every 2 s."""
    for extra, evaluations in (("", 1), ("group_s = 2\n", 3)):
        config = alerts_config(tmp_path, web, socks(), [], extra)
        config.write_text(config.read_text().replace("interval_s = 2", "interval_s = 60"))
        daemon = daemons(config)
        seen: set[int] = set()

        def evaluated(count: int = evaluations, daemon: Daemon = daemon, seen: set[int] = seen) -> bool:
            seen.add(evaluated_ms(daemon))
            return len(seen - {0}) >= count

        daemon.wait_until(evaluated, 120, f"{evaluations} evaluations")
        started = len(seen - {0})
        if evaluations == 1:  # and no second one: no round was stored since
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                evaluated()
                time.sleep(0.2)
            assert len(seen - {0}) == started == 1, seen
        assert daemon.stop() == 0, daemon.output()
        daemon.db.unlink()
