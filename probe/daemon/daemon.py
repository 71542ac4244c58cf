"""The daemon: scheduling, signals, metrics endpoint, graceful shutdown.

Each target is one APScheduler job that probes all of the target's paths together (a
round), on its group's interval. Within a group the jobs' first runs are spread evenly over
one interval, the first at once, so targets do not all fire at once. A reload leaves the job
of an unchanged target alone: reloads in a row must never push its rounds back. Signal
handlers only set flags; the work happens on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.events import (
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobExecutionEvent,
)
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from probe.config import Config, PathSpec, Target, load_config
from probe.daemon.metrics import Metrics
from probe.daemon.systemd import notify, watchdog_interval_s
from probe.daemon.writer import StoreWriter
from probe.errors import ConfigError, StoreError, TunnelwatchError
from probe.fleet.forwarder import Forwarder
from probe.measure.rounds import ProbeContext, path_rows, plan, run_loop, run_round
from probe.store.sqlite import StoreLock, open_store

log = logging.getLogger("tunnelwatch.daemon")
LOOP_LAG_CHECK_S = 1.0
MAX_FORWARD_RETRY_S = 300.0


@dataclass(frozen=True, slots=True)
class Unit:
    """One scheduled job: a target and every path it is probed through."""

    target: Target
    paths: tuple[PathSpec, ...]
    interval_s: float
    first_run: datetime

    def scheduled_for(self, now: datetime) -> datetime:
        """The grid time this run was meant for (the trigger has no jitter)."""
        steps = max(0, int((now - self.first_run).total_seconds() // self.interval_s))
        return self.first_run + timedelta(seconds=steps * self.interval_s)

    def offset_s(self, now: datetime) -> float:
        """How long after `now` its next run comes, in [0, interval)."""
        return (self.first_run - now).total_seconds() % self.interval_s


def build_units(config: Config, now: datetime, previous: Mapping[str, Unit] | None = None) -> list[Unit]:
    """One unit per target, in config order. A target whose definition and interval are those
    of its unit in `previous` keeps that unit's grid, so its next run time; its paths are
    the new ones. The others of a group are spread over one interval from `now`, the first at
    once; when the group keeps some units, each new one takes the middle of the group's
    longest wait between two runs."""
    by_target: dict[str, list[PathSpec]] = defaultdict(list)
    targets: dict[str, Target] = {}
    for target, path in plan(config):
        by_target[target.name].append(path)
        targets[target.name] = target
    by_group: dict[str, list[str]] = defaultdict(list)
    for name, target in targets.items():
        by_group[target.group].append(name)
    previous = previous or {}
    units: dict[str, Unit] = {}
    for group, names in by_group.items():
        interval = config.interval_s(group)
        fresh = []
        for name in names:
            old = previous.get(name)
            if old is not None and old.target == targets[name] and old.interval_s == interval:
                units[name] = replace(old, target=targets[name], paths=tuple(by_target[name]))
            else:
                fresh.append(name)
        kept = [units[name].offset_s(now) for name in names if name in units]
        for index, name in enumerate(fresh):
            if kept:
                offset = _middle_of_longest_wait(kept, interval)
                kept.append(offset)
            else:
                offset = interval * index / len(fresh)
            units[name] = Unit(targets[name], tuple(by_target[name]), interval, now + timedelta(seconds=offset))
    return [units[name] for name in targets]


def _middle_of_longest_wait(offsets: list[float], interval: float) -> float:
    """The middle of the longest wait between runs at these offsets, every `interval` seconds."""
    points = sorted(offsets)
    waits = [(b - a, a) for a, b in zip(points, [*points[1:], points[0] + interval], strict=True)]
    length, start = max(waits, key=lambda wait: wait[0])
    return (start + length / 2) % interval


class Daemon:
    def __init__(self, config: Config, config_path: Path | None) -> None:
        self._config = config
        self._config_path = config_path
        self._ctx = ProbeContext.build(config)
        self._metrics = Metrics()
        self._units: dict[str, Unit] = {}
        self._rounds: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self._signals = 0
        self._scheduler: AsyncIOScheduler | None = None
        self._writer: StoreWriter | None = None
        self._forwarder: Forwarder | None = None
        self._forward_failing_since: float | None = None
        self._exit_code = 0  # 1 when a helper died and stopped the daemon

    async def run(self) -> int:
        config = self._config
        lock = StoreLock(config.store.path)
        lock.acquire()
        store = open_store(config.store.path, lock)
        server = None
        uplink: Any = None
        try:
            store.record_paths(path_rows(config))
            if config.metrics.enabled:
                host, port = config.metrics.host_port
                try:
                    server = self._metrics.serve(host, port)
                except OSError as exc:
                    raise ConfigError(
                        f"{config.source}: metrics.listen: cannot listen on {config.metrics.listen}: {exc}"
                    ) from None
            self._writer = StoreWriter(store, self._metrics, config.daemon.store_buffer, config.daemon.store_retry_s)
            if config.store.url is not None:
                url, conninfo = config.store.url.get_secret_value(), None
                if config.store.uplink is not None:
                    from probe.fleet.uplink import Uplink

                    uplink = Uplink(url, config.path(config.store.uplink))
                    conninfo = await uplink.start()
                self._forwarder = Forwarder(
                    config.store.path,
                    url,
                    config.vantage.name,
                    config.store.forward_batch,
                    config.store.spool_max_rows,
                    conninfo,
                )
            await self._serve()
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
            if self._forwarder is not None:
                self._forwarder.close()
            if uplink is not None:
                await uplink.close()
            store.close()
            lock.release()
        return self._exit_code

    async def _serve(self) -> None:
        assert self._writer is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload_wanted.set)
        scheduler = self._scheduler = AsyncIOScheduler(
            event_loop=loop,
            timezone=UTC,
            job_defaults={
                "max_instances": 1,
                "coalesce": True,
                "misfire_grace_time": max(1, round(self._config.daemon.misfire_grace_s)),
            },
        )
        scheduler.add_listener(self._on_skipped, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        self._schedule()
        scheduler.start()
        helpers = [
            loop.create_task(self._writer.run()),
            loop.create_task(self._watch_loop_lag()),
            loop.create_task(self._reload_loop()),
        ]
        if self._forwarder is not None:
            helpers.append(loop.create_task(self._forward_loop()))
        for helper in helpers:
            helper.add_done_callback(self._on_helper_done)
        notify("READY=1")
        self._status()
        log.info(
            "probing %d targets through %d paths into %s%s",
            len(self._units),
            len(self._config.paths),
            self._config.store.path,
            f"; metrics on http://{self._config.metrics.listen}/metrics" if self._config.metrics.enabled else "",
        )
        await self._stop.wait()
        notify("STOPPING=1")
        scheduler.pause()
        in_flight = set(self._rounds)
        if in_flight:
            log.info("stopping: letting %d rounds in flight finish", len(in_flight))
            _, late = await asyncio.wait(in_flight, timeout=self._config.daemon.drain_timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        scheduler.shutdown(wait=False)
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        if not await self._writer.flush():
            log.error("could not write %d measurements before exiting", self._writer.buffered)
        if self._forwarder is not None:
            await self._forward_once(final=True)
        log.info("stopped")

    def _on_helper_done(self, task: asyncio.Task[Any]) -> None:
        """A helper (the store writer, the forwarder, ...) ends only when cancelled at stop:
        one that dies is an error that stops the daemon, never a silent monitor that stores nothing."""
        if task.cancelled() or self._stop.is_set():
            return
        log.error("stopping: %s ended unexpectedly", task.get_coro().__qualname__, exc_info=task.exception())
        self._exit_code = 1
        self._stop.set()

    def _schedule(self) -> None:
        """Make the jobs match self._config. A job whose settings did not change is left as it
        is, with its next run time: rebuilding it from now would push it back at each reload."""
        scheduler = self._scheduler
        assert scheduler is not None
        config = self._config
        report = scheduler.get_job("weekly-report")
        if not config.report.weekly:
            if report is not None:
                scheduler.remove_job("weekly-report")
        elif report is None or str(report.trigger.timezone) != config.report.timezone:
            scheduler.add_job(
                self._weekly_report,
                CronTrigger(day_of_week="mon", hour=0, minute=0, timezone=config.report.timezone),
                id="weekly-report",
                name="weekly report",
                misfire_grace_time=6 * 3600,
                replace_existing=True,
            )
        compact = scheduler.get_job("compact")
        if compact is None or compact.trigger.interval_length != config.daemon.compact_every_s:
            scheduler.add_job(
                self._compact,
                IntervalTrigger(seconds=config.daemon.compact_every_s, timezone=UTC),
                id="compact",
                name="compaction",
                misfire_grace_time=1800,
                coalesce=True,
                replace_existing=True,
            )
        previous = self._units
        self._units = {u.target.name: u for u in build_units(config, datetime.now(UTC), previous)}
        for name in previous.keys() - self._units.keys():
            scheduler.remove_job(name)
        for name, unit in self._units.items():
            old = previous.get(name)
            if old is not None and (old.first_run, old.interval_s) == (unit.first_run, unit.interval_s):
                continue  # its job runs the new unit (new paths) at its next run
            scheduler.add_job(
                self._round,
                IntervalTrigger(seconds=unit.interval_s, start_date=unit.first_run, timezone=UTC),
                args=[name],
                id=name,
                name=f"round {name}",
                next_run_time=unit.first_run,  # the trigger alone would skip a start_date of now
                replace_existing=True,
            )

    async def _round(self, name: str) -> None:
        assert self._writer is not None
        unit = self._units.get(name)
        if unit is None or self._stop.is_set():
            return
        task = asyncio.current_task()
        assert task is not None
        self._rounds.add(task)
        try:
            now = datetime.now(UTC)
            scheduled = unit.scheduled_for(now)
            self._metrics.schedule_lag.observe((now - scheduled).total_seconds())
            started = time.perf_counter()
            pairs = [(unit.target, path) for path in unit.paths]
            measurements, heartbeat = await run_round(self._ctx, pairs, target=name, scheduled_at=scheduled)
            elapsed = time.perf_counter() - started
            self._writer.submit(measurements, heartbeat)
            group = unit.target.group
            self._metrics.rounds.labels(group).inc()
            self._metrics.round_duration.labels(group).observe(elapsed)
            for m in measurements:
                self._metrics.observe(m)
            self._log_round(unit, measurements, elapsed)
        finally:
            self._rounds.discard(task)

    async def _weekly_report(self) -> None:
        """Last week's report and charts, written by a child process."""
        await self._child("weekly report", "report", "weekly", "--scheduled")

    async def _compact(self) -> None:
        """Summarise the last complete hours and delete raw rows past store.keep_raw_days."""
        await self._child("compaction", "store", "compact")

    async def _child(self, what: str, *args: str) -> None:
        """A command in a child process: its memory (pandas, matplotlib) goes when it ends,
        and its failure is logged and never stops probing."""
        command = [sys.executable, "-m", "probe", *args]
        if self._config_path is not None:
            command += ["--config", str(self._config_path)]
        child = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await child.communicate()
        message = stderr.decode(errors="replace").strip().splitlines()
        if child.returncode == 0:
            log.info("%s: %s", what, message[-1] if message else "done")
        else:
            log.error("%s failed (exit %s): %s", what, child.returncode, " | ".join(message[-5:]))

    def _log_round(self, unit: Unit, measurements: list[Any], elapsed: float) -> None:
        failed = [f"{m.path}={m.failure}@{m.failed_operation}" for m in measurements if not m.ok]
        log.info(
            "round %s: %d/%d paths ok in %.2f s%s",
            unit.target.name,
            len(measurements) - len(failed),
            len(measurements),
            elapsed,
            f"; failing: {', '.join(failed)}" if failed else "",
        )
        if elapsed > unit.interval_s:
            log.warning(
                "round %s took %.1f s, longer than its %.0f s interval: the next start is skipped",
                unit.target.name,
                elapsed,
                unit.interval_s,
            )

    def _on_skipped(self, event: JobExecutionEvent) -> None:
        unit = self._units.get(event.job_id)
        group = unit.target.group if unit else "unknown"
        reason = "overrun" if event.code == EVENT_JOB_MAX_INSTANCES else "missed"
        self._metrics.skipped.labels(group, reason).inc()

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now", sig.name)
            os._exit(1)
        log.info("%s: stopping (send it again to exit at once)", sig.name)
        self._stop.set()

    async def _reload_loop(self) -> None:
        """Reload on SIGHUP, one reload at a time: the signals that come during one make one
        more after it. Reading the files and the CA bundle runs in a thread, so a burst of
        signals never holds up the rounds."""
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            await self._reload()

    async def _reload(self) -> None:
        try:
            config = await asyncio.to_thread(load_config, self._config_path)
        except TunnelwatchError as exc:
            log.error("SIGHUP: keeping the running config, the new one is invalid: %s", exc)
            return
        for key in ("store", "metrics"):
            if getattr(config, key) != getattr(self._config, key):
                log.warning("SIGHUP: [%s] changed; that takes effect at the next restart", key)
        config = config.model_copy(update={"store": self._config.store, "metrics": self._config.metrics})
        try:
            ctx = await asyncio.to_thread(ProbeContext.build, config, self._ctx.lag)  # one loop, one lag sampler
        except OSError as exc:  # the CA file went away or changed since it was read
            log.error("SIGHUP: keeping the running config: %s", exc)
            return
        self._config, self._ctx = config, ctx
        self._metrics.forget_probes()
        assert self._writer is not None
        self._writer.submit_paths(path_rows(config))
        self._schedule()
        self._status()
        log.info("SIGHUP: reloaded %s: %d targets, %d paths", config.source, len(config.targets), len(config.paths))

    async def _forward_loop(self) -> None:
        """Upload the spool's backlog every store.forward_every_s; back off while the central
        store is unreachable. The spool keeps everything meanwhile."""
        delay = every = self._config.store.forward_every_s
        while True:
            await asyncio.sleep(delay)
            delay = every if await self._forward_once() else min(delay * 2, MAX_FORWARD_RETRY_S)

    async def _forward_once(self, final: bool = False) -> bool:
        forwarder = self._forwarder
        assert forwarder is not None
        failing = self._forward_failing_since
        try:
            sent = await asyncio.to_thread(forwarder.forward)
        except StoreError as exc:
            await asyncio.to_thread(forwarder.disconnect)
            self._metrics.forward_errors.inc()
            if failing is None:
                self._forward_failing_since = time.monotonic()
            if failing is None or final:
                log.error("%s; measurements stay in the spool and go up when it is back", exc)
            ok = False
        else:
            self._metrics.forwarded.inc(sent)
            if failing is not None:
                log.warning(
                    "central store %s reachable again after %.0f s; uploaded %d measurements",
                    forwarder.where,
                    time.monotonic() - failing,
                    sent,
                )
                self._forward_failing_since = None
            ok = True
        backlog = await asyncio.to_thread(forwarder.backlog)
        self._metrics.forward_backlog.set(backlog.measurements)
        self._metrics.forward_backlog_age.set(backlog.age_s())
        self._metrics.forward_dropped.set(backlog.dropped)
        return ok

    def _status(self) -> None:
        notify(f"STATUS=probing {len(self._units)} targets through {len(self._config.paths)} paths")

    async def _watch_loop_lag(self) -> None:
        """Measures how late the loop wakes up, and pets systemd's watchdog from the loop
        itself: a loop that hangs stops the pings and systemd restarts the daemon."""
        loop = asyncio.get_running_loop()
        watchdog = watchdog_interval_s()
        period = min(LOOP_LAG_CHECK_S, watchdog) if watchdog else LOOP_LAG_CHECK_S
        while True:
            started = loop.time()
            await asyncio.sleep(period)
            self._metrics.loop_lag.set(max(0.0, loop.time() - started - period))
            if watchdog:
                notify("WATCHDOG=1")


def run_daemon(config_path: Path | None) -> int:
    config = load_config(config_path)
    return run_loop(Daemon(config, config_path).run())
