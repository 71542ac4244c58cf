"""Fleet mode's loop: the spool's backlog uploaded to the central store every
store.forward_every_s (probe/fleet/forwarder.py, in a thread). While the central store
fails, the waits double, up to five minutes; the spool keeps everything meanwhile, and the
outage is logged when it begins and when it ends. The backlog's size and age are metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from probe.config import Config
from probe.daemon.backoff import MAX_WAIT_S, Outage, retry
from probe.daemon.metrics import Metrics
from probe.errors import StoreError
from probe.fleet.forwarder import Forwarder

log = logging.getLogger("tunnelwatch.daemon")


class Forwarding:
    def __init__(self, forwarder: Forwarder, metrics: Metrics, every_s: float) -> None:
        self._forwarder = forwarder
        self._metrics = metrics
        self._every_s = every_s
        self._outage = Outage()

    async def run(self) -> None:
        """Upload every `every_s`; after a failure, again after twice that, then twice as
        long each time, five minutes at most. Cancel to stop."""
        while True:
            await asyncio.sleep(self._every_s)
            await retry(self.once, min(2 * self._every_s, MAX_WAIT_S))

    async def once(self, final: bool = False) -> bool:
        """One upload of the whole backlog; whether the central store took it. `final`, at
        stop: a failure is logged even within an outage."""
        forwarder = self._forwarder
        try:
            sent = await asyncio.to_thread(forwarder.forward)
        except StoreError as exc:
            await asyncio.to_thread(forwarder.disconnect)
            self._metrics.forward_errors.inc()
            if self._outage.failed() or final:
                log.error("%s; measurements stay in the spool and go up when it is back", exc)
            ok = False
        else:
            self._metrics.forwarded.inc(sent)
            if (lasted := self._outage.recovered()) is not None:
                log.warning(
                    "central store %s reachable again after %.0f s; uploaded %d measurements",
                    forwarder.where,
                    lasted,
                    sent,
                )
            ok = True
        backlog = await asyncio.to_thread(forwarder.backlog)
        self._metrics.forward_backlog.set(backlog.measurements)
        self._metrics.forward_backlog_age.set(backlog.age_s())
        self._metrics.forward_dropped.set(backlog.dropped)
        return ok


@contextlib.asynccontextmanager
async def forwarding(config: Config, metrics: Metrics) -> AsyncIterator[Forwarding | None]:
    """The forwarding of `config` (None without store.url), through its uplink when it has one;
    closed on the way out."""
    if config.store.url is None:
        yield None
        return
    url, conninfo = config.store.url.get_secret_value(), None
    async with contextlib.AsyncExitStack() as stack:
        if config.store.uplink is not None:
            from probe.fleet.uplink import Uplink  # psycopg: only a daemon with store.uplink needs it

            uplink = Uplink(url, config.path(config.store.uplink))
            stack.push_async_callback(uplink.close)
            conninfo = await uplink.start()
        store = config.store
        forwarder = Forwarder(store.path, url, config.vantage.name, store.forward_batch, store.spool_max_rows, conninfo)
        stack.callback(forwarder.close)
        yield Forwarding(forwarder, metrics, store.forward_every_s)
