"""The daemon's lifecycle: `serve` builds the parts, `Daemon` runs them until a signal.

The parts, each with one job: the store writer (writer.py), the rounds (probing.py), the
schedule and its child jobs (schedule.py, jobs.py), reloads (reload.py), the upload to the
fleet's central store (forwarding.py), the loop-lag watch and systemd's watchdog
(watchdog.py), the alerts' evaluation after each stored round (evaluations.py) and the
notifier that sends their messages (notifier.py). They are built before the daemon starts and closed in reverse order after it
stops, by one exit stack. Signal handlers only set flags; the work happens on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from probe.config import Config, load_config
from probe.daemon.dashboard import Dashboard, listen
from probe.daemon.evaluations import Evaluations
from probe.daemon.forwarding import Forwarding, forwarding
from probe.daemon.jobs import ChildJobs
from probe.daemon.metrics import Metrics
from probe.daemon.notifier import Notifier
from probe.daemon.probing import Rounds
from probe.daemon.reload import Reloader
from probe.daemon.schedule import Schedule
from probe.daemon.systemd import notify
from probe.daemon.watchdog import watch_loop
from probe.daemon.writer import StoreWriter
from probe.errors import ConfigError
from probe.logs import counted
from probe.measure.rounds import ProbeContext, path_rows, run_loop
from probe.store.file import StoreLock
from probe.store.sqlite import open_store

log = logging.getLogger("tunnelwatch.daemon")


class Daemon:
    """Starts the schedule and the helpers (writer, watch, reloads, forwarding), waits for
    SIGTERM or SIGINT, lets the rounds in flight finish, and writes and uploads what is left.
    A helper that dies stops the daemon with exit code 1."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics,
        writer: StoreWriter,
        rounds: Rounds,
        schedule: Schedule,
        reloader: Reloader,
        forwarding: Forwarding | None,
        stopping: asyncio.Event,
        notifier: Notifier,
        evaluations: Evaluations,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._writer = writer
        self._rounds = rounds
        self._schedule = schedule
        self._reloader = reloader
        self._forwarding = forwarding
        self._notifier = notifier
        self._evaluations = evaluations
        self._stopping = stopping  # shared with the rounds: none starts once it is set
        self._signals = 0
        self._exit_code = 0  # 1 when a helper died and stopped the daemon

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reloader.want)
        self._schedule.start()
        helpers = [
            self._helper(self._writer.run(), "the store writer"),
            self._helper(watch_loop(self._metrics), "the loop watch"),
            self._helper(self._reloader.run(self._apply), "the reloader"),
            self._helper(self._evaluations.run(), "the alerts' evaluation"),
            self._helper(self._notifier.run(), "the notifier"),
        ]
        if self._forwarding is not None:
            helpers.append(self._helper(self._forwarding.run(), "the forwarding"))
        notify("READY=1")
        self._status()
        config = self._config
        log.info(
            "probing %s through %s into %s%s",
            counted(len(self._schedule.units), "target"),
            counted(len(config.paths), "path"),
            config.store.path,
            f"; metrics on http://{config.metrics.listen}/metrics" if config.metrics.enabled else "",
        )
        await self._stopping.wait()
        notify("STOPPING=1")
        self._schedule.pause()
        await self._rounds.drain(self._config.daemon.drain_timeout_s)
        self._schedule.shutdown()
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        if not await self._writer.flush():
            log.error("could not write %d measurements before exiting", self._writer.buffered)
        if self._forwarding is not None:
            await self._forwarding.once(final=True)
        log.info("stopped")
        return self._exit_code

    def _helper(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        task.add_done_callback(self._on_helper_done)
        return task

    def _on_helper_done(self, task: asyncio.Task[None]) -> None:
        """A helper ends only when cancelled at stop: one that dies is an error that stops
        the daemon, never a silent monitor that stores nothing."""
        if task.cancelled() or self._stopping.is_set():
            return
        log.error("stopping: %s ended unexpectedly", task.get_name(), exc_info=task.exception())
        self._exit_code = 1
        self._stopping.set()

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now", sig.name)
            os._exit(1)
        log.info("%s: stopping (send it again to exit at once)", sig.name)
        self._stopping.set()

    def _apply(self, config: Config, ctx: ProbeContext) -> None:
        """A reloaded config, to every part that reads it."""
        self._config = config
        self._rounds.ctx = ctx
        self._metrics.forget_probes()
        self._writer.submit_paths(path_rows(config))
        self._schedule.apply(config)
        self._evaluations.apply(config)
        self._notifier.apply(config)
        self._status()

    def _status(self) -> None:
        targets, paths = counted(len(self._schedule.units), "target"), counted(len(self._config.paths), "path")
        notify(f"STATUS=probing {targets} through {paths}")


def run_daemon(config_path: Path | None) -> int:
    """`tunnelwatch run`: the daemon on the config at `config_path`, on the probing event loop."""
    return run_loop(serve(load_config(config_path), config_path))


async def serve(config: Config, config_path: Path | None) -> int:
    """Build the parts, run the daemon until it stops, close the parts in reverse order
    whatever happens; its exit code."""
    ctx = ProbeContext.build(config)
    metrics = Metrics()
    stopping = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        lock = StoreLock(config.store.path)
        lock.acquire()
        stack.callback(lock.release)
        store = open_store(config.store.path, lock)
        stack.callback(store.close)
        store.record_paths(path_rows(config))
        if config.metrics.enabled:
            host, port = config.metrics.host_port
            try:
                server = listen(metrics.registry, host, port, stack.enter_context(Dashboard(config, config_path)))
            except OSError as exc:
                raise ConfigError(
                    f"{config.source}: metrics.listen: cannot listen on {config.metrics.listen}: {exc}"
                ) from None
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
        notifier = Notifier(config, metrics)
        stack.push_async_callback(notifier.close)
        jobs = ChildJobs(config_path)
        evaluations = Evaluations(config, jobs, notifier.wake)
        writer = StoreWriter(
            store, metrics, config.daemon.store_buffer, config.daemon.store_retry_s, evaluations.round_stored
        )
        uploads = await stack.enter_async_context(forwarding(config, metrics))
        rounds = Rounds(ctx, writer, metrics, stopping)
        daemon = Daemon(
            config,
            metrics=metrics,
            writer=writer,
            rounds=rounds,
            schedule=Schedule(config, rounds.run, jobs, metrics),
            reloader=Reloader(config_path, config, ctx),
            forwarding=uploads,
            stopping=stopping,
            notifier=notifier,
            evaluations=evaluations,
        )
        return await daemon.run()
