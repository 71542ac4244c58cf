"""The schedule: one APScheduler job a target, and the daemon's child jobs.

Each target is one job that probes all of the target's paths together (a round), on its
group's interval. Within a group the jobs' first runs are spread evenly over one interval,
the first at once, so targets do not all fire at once. A reload leaves the job of an
unchanged target alone, and gives a new one the middle of its group's longest wait: reloads
in a row must never push a target's rounds back nor bunch them up.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from probe.config import Config, PathSpec, Target
from probe.daemon.jobs import ChildJobs
from probe.daemon.metrics import Metrics
from probe.measure.rounds import plan

WEEKLY_REPORT, COMPACT = "weekly-report", "compact"  # the child jobs' ids; a target's job has its name


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


class Schedule:
    """The jobs on the running event loop: a round of each unit at its times (`run_round`), the
    compaction every daemon.compact_every_s and the weekly report (`jobs`). A run that comes
    while the previous one still runs, or too late, is skipped and counted."""

    def __init__(
        self, config: Config, run_round: Callable[[Unit], Awaitable[None]], jobs: ChildJobs, metrics: Metrics
    ) -> None:
        self._config = config
        self._run_round = run_round
        self._jobs = jobs
        self._metrics = metrics
        self._units: dict[str, Unit] = {}
        self._scheduler = AsyncIOScheduler(
            event_loop=asyncio.get_running_loop(),
            timezone=UTC,
            job_defaults={
                "max_instances": 1,
                "coalesce": True,
                "misfire_grace_time": max(1, round(config.daemon.misfire_grace_s)),
            },
        )
        self._scheduler.add_listener(self._on_skipped, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)

    @property
    def units(self) -> Mapping[str, Unit]:
        return self._units

    def next_run(self, job_id: str) -> datetime | None:
        """When the job of a target (its name), or a child job, runs next; None when there is none."""
        job = self._scheduler.get_job(job_id)
        when: datetime | None = None if job is None else job.next_run_time
        return when

    def start(self, paused: bool = False) -> None:
        self.apply(self._config)
        self._scheduler.start(paused=paused)

    def pause(self) -> None:
        self._scheduler.pause()

    def shutdown(self) -> None:
        self._scheduler.shutdown(wait=False)

    def apply(self, config: Config) -> None:
        """Make the jobs match `config`. A job whose settings did not change is left as it is,
        with its next run time: rebuilding it from now would push it back at each reload."""
        self._config = config
        self._child_jobs(config)
        previous = self._units
        self._units = {u.target.name: u for u in build_units(config, datetime.now(UTC), previous)}
        for name in previous.keys() - self._units.keys():
            self._scheduler.remove_job(name)
        for name, unit in self._units.items():
            old = previous.get(name)
            if old is not None and (old.first_run, old.interval_s) == (unit.first_run, unit.interval_s):
                continue  # its job runs the new unit (new paths) at its next run
            self._scheduler.add_job(
                self._round,
                IntervalTrigger(seconds=unit.interval_s, start_date=unit.first_run, timezone=UTC),
                args=[name],
                id=name,
                name=f"round {name}",
                next_run_time=unit.first_run,  # the trigger alone would skip a start_date of now
                replace_existing=True,
            )

    def _child_jobs(self, config: Config) -> None:
        scheduler = self._scheduler
        report = scheduler.get_job(WEEKLY_REPORT)
        if not config.report.weekly:
            if report is not None:
                scheduler.remove_job(WEEKLY_REPORT)
        elif report is None or str(report.trigger.timezone) != config.report.timezone:
            scheduler.add_job(
                self._jobs.weekly_report,
                CronTrigger(day_of_week="mon", hour=0, minute=0, timezone=config.report.timezone),
                id=WEEKLY_REPORT,
                name="weekly report",
                misfire_grace_time=6 * 3600,
                replace_existing=True,
            )
        compact = scheduler.get_job(COMPACT)
        if compact is None or compact.trigger.interval_length != config.daemon.compact_every_s:
            scheduler.add_job(
                self._jobs.compact,
                IntervalTrigger(seconds=config.daemon.compact_every_s, timezone=UTC),
                id=COMPACT,
                name="compaction",
                misfire_grace_time=1800,
                coalesce=True,
                replace_existing=True,
            )

    async def _round(self, name: str) -> None:
        """The job of a target: a round of its unit as it is now (a reload may have changed its paths)."""
        unit = self._units.get(name)
        if unit is not None:
            await self._run_round(unit)

    def _on_skipped(self, event: JobExecutionEvent) -> None:
        unit = self._units.get(event.job_id)
        group = unit.target.group if unit else "unknown"
        reason = "overrun" if event.code == EVENT_JOB_MAX_INSTANCES else "missed"
        self._metrics.skipped.labels(group, reason).inc()
