"""The daemon's notifier: sends the messages analysis/alerts.py queues in the store
(probe/store/outbox.py) through Apprise (probe/daemon/delivery.py), and keeps at it.

- Each destination (one alerts.urls URL) gets its messages oldest first, one at a time: a
  receiver that was down gets them all, in order, when it is back. Destinations are sent to
  at once, each in a thread (or a child process, with alerts.via), so a slow or failing one
  holds up no other, and probing never waits for any.
- A failed send is tried again after alerts.retry_s, then twice as long each time, up to
  alerts.retry_max_s; the attempts, the reason and the next try are kept in the message's
  row, so a restarted daemon goes on where it was. A destination's failing streak is logged
  when it begins and when it ends (the first failure of a message, the send after failures).
- Messages for a destination no longer in alerts.urls are dropped, and said so. Those
  queued after the daemon read its config are kept: the evaluation (a child process) reads
  the config file, which may name a destination the daemon learns of at its next reload.
- A message is marked sent once Apprise says it went; at stop the sends under way get
  STOP_WAIT_S to finish. A daemon killed between the two sends it again (at least once).
- With alerts.via, messages leave through that path: Apprise runs in a child process whose
  HTTP(S) and SMTP connections go to a loopback proxy (probe/daemon/relay.py) that carries
  them through the path.

The store is read and written in a thread of its own, with a short connection each time:
the writer may reopen the store file meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from probe.config import Config
from probe.daemon.backoff import Outage
from probe.daemon.delivery import label, send
from probe.daemon.metrics import Metrics
from probe.daemon.relay import ProxyRelay
from probe.store import outbox
from probe.store.outbox import Message, destination_id

log = logging.getLogger("tunnelwatch.daemon")
T = TypeVar("T")
IDLE_S = 30.0  # the longest wait between two looks at the store (the gauges)
SENDERS = 8  # threads sending at once (one per destination at a time)
STOP_WAIT_S = 10.0  # at stop, how long the sends under way may take to finish


class Notifier:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._sending: dict[str, asyncio.Task[None]] = {}
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="tunnelwatch-outbox")
        self._senders = ThreadPoolExecutor(SENDERS, thread_name_prefix="tunnelwatch-notify")
        self._relay: ProxyRelay | None = None
        self._store_outage = Outage()
        self._stopping = False  # no new send starts
        self._config_ms = _now_ms()  # when the daemon (re)read its config
        self._strangers: set[str] = set()  # destinations seen queued but not configured here, said once

    def wake(self) -> None:
        """Look at the store now (an evaluation may have queued messages)."""
        self._wake.set()

    def apply(self, config: Config) -> None:
        """A reloaded config: its URLs, retry settings and via from the next look on."""
        self._config = config
        self._config_ms = _now_ms()
        self._strangers.clear()
        self._wake.set()

    async def run(self) -> None:
        """Send what is due, then wait for a wake-up or the next message due. Cancel to stop."""
        try:
            while True:
                wait_s = await self.once()
                with contextlib.suppress(TimeoutError):
                    # not asyncio.wait_for: on Python 3.11 it swallows a cancel that comes as the
                    # wake-up does (cpython#86296), and the daemon's stop then waited for the
                    # notifier forever (an evaluation ending as the rounds drained woke it)
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()
                self._wake.clear()
        finally:  # at stop: the sends under way may finish and be marked (else they go again after a restart)
            self._stopping = True
            sending = list(self._sending.values())
            if sending:
                await asyncio.wait(sending, timeout=STOP_WAIT_S)
            for task in sending:
                task.cancel()
            await asyncio.gather(*sending, return_exceptions=True)

    async def close(self) -> None:
        if self._relay is not None:
            await self._relay.close()
            self._relay = None
        self._store_thread.shutdown(wait=False)
        self._senders.shutdown(wait=False, cancel_futures=True)

    async def once(self) -> float:
        """Start sending to every destination whose oldest message is due; the seconds until
        the next one is."""
        urls = {destination_id(u.get_secret_value()): u.get_secret_value() for u in self._config.alerts.urls}
        try:
            heads, dropped = await self._store(_look, list(urls), self._config_ms)
        except sqlite3.Error as exc:
            if self._store_outage.failed():
                log.error("notifications: cannot read the store (%s); will retry", exc)
            return IDLE_S
        if (lasted := self._store_outage.recovered()) is not None:
            log.warning("notifications: the store readable again after %.0f s", lasted)
        for destination, count in dropped.items():
            self._metrics.notifications_dropped.inc(count)
            log.warning(
                "dropped %d unsent notifications of destination %s: no longer in alerts.urls", count, destination
            )
        now_ms = _now_ms()
        wait_s = IDLE_S
        for message in heads:
            if message.destination not in urls and message.destination not in self._strangers:
                self._strangers.add(message.destination)
                log.warning(
                    "notifications queued for destination %s, which is not in this daemon's alerts.urls: "
                    "kept until a reload (SIGHUP) brings the config file's URLs in",
                    message.destination,
                )
            if message.destination in self._sending or message.destination not in urls:
                continue
            if message.next_try_ms <= now_ms:
                url = urls[message.destination]
                task = asyncio.get_running_loop().create_task(self._drain(message.destination, url))
                self._sending[message.destination] = task
            else:
                wait_s = min(wait_s, (message.next_try_ms - now_ms) / 1000)
        return max(wait_s, 0.05)

    async def _drain(self, destination: str, url: str) -> None:
        """Send a destination's due messages in order, until none is left or one fails."""
        try:
            while (message := await self._store(outbox.head, destination)) is not None:
                if message.next_try_ms > _now_ms() or self._stopping:
                    return
                if not await self._send(message, url):
                    return
        except sqlite3.Error as exc:  # held back a while: a send the store could not mark must not repeat at once
            if self._store_outage.failed():
                log.error("notifications: cannot read or write the store (%s); will retry", exc)
            await asyncio.sleep(IDLE_S)
        finally:
            del self._sending[destination]
            self._wake.set()

    async def _send(self, message: Message, url: str) -> bool:
        alerts = self._config.alerts
        started = time.monotonic()
        try:
            proxy = await self._proxy()
            sent, reason = await send(url, message.title, message.body, self._senders, proxy)
        except Exception as exc:  # Apprise's own bug, or the child could not start: a failed attempt
            sent, reason = False, f"{type(exc).__name__}: {exc}"
        where = label(url)
        if sent:
            await self._store(outbox.mark_sent, message.id, _now_ms())
            self._metrics.notifications_sent.inc()
            if message.attempts:
                log.warning(
                    "notifications to %s sent again, after %d failed attempts since %s (%s)",
                    where,
                    message.attempts,
                    _ago(message.created_ms),
                    message.title,
                )
            else:
                log.info("notification sent to %s in %.1f s: %s", where, time.monotonic() - started, message.title)
            return True
        wait_s = min(alerts.retry_s * 2**message.attempts, alerts.retry_max_s)
        await self._store(outbox.mark_failed, message.id, reason, _now_ms() + round(wait_s * 1000))
        self._metrics.notifications_failed.inc()
        if not message.attempts:
            log.error(
                "notification to %s failed%s: %s; retrying after %.0f s, then up to every %.0f s, in order",
                where,
                f" through {alerts.via}" if alerts.via else "",
                reason,
                wait_s,
                alerts.retry_max_s,
            )
        return False

    async def _proxy(self) -> str | None:
        """The relay's URL for alerts.via (started, or restarted for another path), or None."""
        via = self._config.alerts.via
        if self._relay is not None and (via is None or self._relay.path != self._config.path(via)):
            await self._relay.close()
            self._relay = None
        if via is None:
            return None
        if self._relay is None:
            relay = ProxyRelay(self._config.path(via))
            await relay.start()
            self._relay = relay
        return self._relay.proxy_url

    async def _store(self, work: Callable[..., T], *args: object) -> T:
        """`work(db, *args)` on a short connection to the store, in the store thread; the
        gauges are brought up to date after it."""
        path = self._config.store.path
        return await asyncio.get_running_loop().run_in_executor(
            self._store_thread, _with_store, path, self._metrics, work, args
        )


def _with_store(path: Path, metrics: Metrics, work: Callable[..., T], args: tuple[object, ...]) -> T:
    # never creates a file: a store deleted meanwhile is the writer's to notice and replace
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=10)) as db:
        result = work(db, *args)
        pending, opened = outbox.counts(db)
    metrics.notifications_pending.set(pending)
    metrics.alerts_open.set(opened)
    return result


def _look(db: sqlite3.Connection, destinations: list[str], before_ms: int) -> tuple[list[Message], dict[str, int]]:
    dropped = outbox.drop_unknown(db, destinations, before_ms)
    return outbox.heads(db), dropped


def _now_ms() -> int:
    return round(time.time() * 1000)


def _ago(ms: int) -> str:
    return f"{(_now_ms() - ms) / 1000:.0f} s ago"


def send_test(cfg: Config) -> list[tuple[str, bool, str]]:
    """A test message to every alerts.urls destination, at once (through alerts.via when
    set): (destination, sent, why not), in the order of alerts.urls."""
    return asyncio.run(_send_test(cfg))


async def _send_test(cfg: Config) -> list[tuple[str, bool, str]]:
    relay: ProxyRelay | None = None
    via = f" through {cfg.alerts.via}" if cfg.alerts.via else ""
    title = f"tunnelwatch {cfg.vantage.name}: test"
    body = f"A test message from tunnelwatch at {cfg.vantage.name}{via}: alerts reach you here."
    urls = [u.get_secret_value() for u in cfg.alerts.urls]
    with ThreadPoolExecutor(max(1, min(len(urls), SENDERS)), thread_name_prefix="tunnelwatch-notify") as senders:
        try:
            if cfg.alerts.via is not None:
                relay = ProxyRelay(cfg.path(cfg.alerts.via))
                await relay.start()
            proxy = relay.proxy_url if relay is not None else None
            outcomes = await asyncio.gather(*(send(url, title, body, senders, proxy) for url in urls))
        finally:
            if relay is not None:
                await relay.close()
    return [(label(url), sent, reason) for url, (sent, reason) in zip(urls, outcomes, strict=True)]
