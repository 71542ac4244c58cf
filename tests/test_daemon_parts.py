"""The daemon's parts one by one, in this process: retries and outages, the schedule and its
reloads, the rounds, SIGHUP's reloads, the child jobs, the forwarding loop, the loop watch
and the metrics table; then the whole lifecycle, built and stopped by a real SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sqlite3
import time
import typing
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from probe.config import Config, load_config
from probe.daemon import backoff
from probe.daemon.backoff import Outage, retry
from probe.daemon.daemon import serve
from probe.daemon.forwarding import forwarding
from probe.daemon.jobs import ERROR_LINES, ChildJobs, outcome
from probe.daemon.metrics import METRICS, Metrics
from probe.daemon.probing import Rounds
from probe.daemon.reload import Reloader
from probe.daemon.schedule import COMPACT, WEEKLY_REPORT, Schedule, Unit, build_units
from probe.daemon.watchdog import watch_loop
from probe.daemon.writer import StoreWriter
from probe.logs import counted
from probe.measure.rounds import ProbeContext
from probe.store.file import StoreLock
from probe.store.sqlite import open_store
from tests.conftest import rows, write_config
from tests.postgres import cluster
from tests.servers import LOOPBACK, free_port

DAEMON_LOG = "tunnelwatch.daemon"
DIRECT = '[[paths]]\nname = "direct"\nkind = "direct"\n'


def tcp_targets(port: int, *names: str, group: str = "g") -> str:
    return "".join(
        f'[[targets]]\nname = "{n}"\ngroup = "{group}"\nkind = "tcp"\nhost = "{LOOPBACK}"\nport = {port}\n\n'
        for n in names
    )


def config_with(tmp_path: Path, body: str, **sections: str) -> Path:
    """A config of `body` (targets and paths) with extra `key = value` lines in its sections."""
    path = write_config(tmp_path, body)
    text = path.read_text()
    for section, lines in sections.items():
        header = f"[{section}]"
        text = text.replace(header, f"{header}\n{lines}", 1) if header in text else f"{text}\n{header}\n{lines}\n"
    path.write_text(text)
    return path


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every asyncio.sleep the code under test asks for, in order; each only yields once."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        asked.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return asked


# The retry helper and outages (probe/daemon/backoff.py)


def test_retry_doubles_its_wait_after_each_failure_up_to_the_bound(waits: list[float]) -> None:
    results = iter([False] * 6 + [True])
    tries = 0

    async def attempt() -> bool:
        nonlocal tries
        tries += 1
        return next(results)

    asyncio.run(retry(attempt, 0.5, max_wait_s=6))
    assert tries == 7
    assert waits == [0.5, 1, 2, 4, 6, 6]


def test_retry_does_not_wait_when_the_first_try_works(waits: list[float]) -> None:
    async def attempt() -> bool:
        return True

    asyncio.run(retry(attempt, 5))
    assert waits == []
    assert backoff.MAX_WAIT_S == 300  # README: "backs off up to five minutes"


def test_an_outage_begins_at_its_first_failure_and_ends_at_the_first_success() -> None:
    outage = Outage()
    assert outage.recovered() is None  # no outage: nothing to log
    assert outage.failed() is True  # the one failure worth a log line
    assert outage.failed() is False
    time.sleep(0.05)
    lasted = outage.recovered()
    assert lasted is not None and lasted >= 0.05
    assert outage.recovered() is None and outage.failed() is True  # a new outage


# The schedule (probe/daemon/schedule.py)


def _schedule(config: Config) -> Schedule:
    async def no_round(unit: Unit) -> None:
        raise AssertionError("the schedule is paused: no round runs")

    schedule = Schedule(config, no_round, ChildJobs(None), Metrics())
    schedule.start(paused=True)
    return schedule


def test_a_reload_keeps_the_next_run_of_unchanged_targets_and_puts_new_ones_in_the_longest_wait(
    tmp_path: Path, closed_port: int
) -> None:
    """Three targets every 60 s run 20 s apart. A reload drops t1, adds t3 and a path: t0 and
    t2 keep their next runs (with the new path), t3 takes the middle of the longest wait,
    where t1 was. A second one changes t2's port: its new job takes the longest wait again."""
    path = config_with(tmp_path, tcp_targets(closed_port, "t0", "t1", "t2") + DIRECT, probe="interval_s = 60")
    lo2 = '[[paths]]\nname = "lo2"\nkind = "bind"\naddress = "127.0.0.2"\n'

    def seconds(a: datetime | None, b: datetime | None) -> float:
        assert a is not None and b is not None
        return (a - b).total_seconds()

    async def scenario() -> None:
        schedule = _schedule(load_config(path))
        before = {name: schedule.next_run(name) for name in ("t0", "t1", "t2", COMPACT)}
        assert seconds(before["t1"], before["t0"]) == seconds(before["t2"], before["t1"]) == 20
        await asyncio.sleep(0.2)  # a reload later on: the spacing must not count from it
        path.write_text(
            path.read_text().replace(tcp_targets(closed_port, "t1"), "") + tcp_targets(closed_port, "t3") + lo2
        )
        schedule.apply(load_config(path))
        assert (schedule.next_run("t0"), schedule.next_run("t2")) == (before["t0"], before["t2"])
        assert [p.name for p in schedule.units["t0"].paths] == ["direct", "lo2"]
        assert schedule.next_run("t1") is None
        assert abs(seconds(schedule.next_run("t3"), before["t1"])) < 0.01
        assert schedule.next_run(COMPACT) == before[COMPACT]  # reloads never push compaction back
        path.write_text(path.read_text().replace(tcp_targets(closed_port, "t2"), tcp_targets(closed_port + 1, "t2")))
        schedule.apply(load_config(path))
        assert schedule.units["t2"].target.port == closed_port + 1
        assert abs(seconds(schedule.next_run("t2"), before["t2"])) < 0.01  # between t3 (+20 s) and t0 (+60 s)
        assert schedule.next_run("t0") == before["t0"]
        schedule.shutdown()

    asyncio.run(scenario())


def test_a_changed_interval_gives_the_group_a_new_grid_spread_from_now(tmp_path: Path, closed_port: int) -> None:
    path = config_with(tmp_path, tcp_targets(closed_port, "a0", "a1") + DIRECT, probe="interval_s = 60")

    async def scenario() -> None:
        schedule = _schedule(load_config(path))
        before = schedule.next_run("a0")
        path.write_text(path.read_text().replace("interval_s = 60", "interval_s = 10"))
        await asyncio.sleep(0.2)
        schedule.apply(load_config(path))
        first, second = schedule.next_run("a0"), schedule.next_run("a1")
        assert first != before and second - first == timedelta(seconds=5)
        assert schedule.units["a1"].interval_s == 10
        schedule.shutdown()

    asyncio.run(scenario())


def test_the_weekly_report_job_follows_the_config(tmp_path: Path, closed_port: int) -> None:
    path = config_with(tmp_path, tcp_targets(closed_port, "t0") + DIRECT, report='timezone = "UTC"')

    async def scenario() -> None:
        schedule = _schedule(load_config(path))
        report = schedule.next_run(WEEKLY_REPORT)
        assert report is not None and report.weekday() == 0 and (report.hour, report.minute) == (0, 0)
        path.write_text(path.read_text().replace("[report]", "[report]\nweekly = false"))
        schedule.apply(load_config(path))
        assert schedule.next_run(WEEKLY_REPORT) is None
        schedule.shutdown()

    asyncio.run(scenario())


# The rounds (probe/daemon/probing.py)


def unit_of(config: Config) -> Unit:
    """The unit of the config's first target, as the schedule makes it."""
    return build_units(config, datetime.now(UTC))[0]


def test_counted_says_one_path_and_two_paths() -> None:
    assert [counted(n, "path") for n in (0, 1, 2)] == ["0 paths", "1 path", "2 paths"]


def test_a_round_is_stored_counted_and_logged_in_the_singular_for_one_path(
    tmp_path: Path, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    path = config_with(tmp_path, tcp_targets(closed_port, "t0") + DIRECT)
    config = load_config(path)
    store = open_store(config.store.path)

    async def scenario() -> None:
        metrics = Metrics()
        writer = StoreWriter(store, metrics, max_buffer=1000, retry_s=0.1)
        rounds = Rounds(ProbeContext.build(config), writer, metrics, asyncio.Event())
        await rounds.run(unit_of(config))
        assert await writer.flush()
        assert metrics.registry.get_sample_value("tunnelwatch_rounds_total", {"group": "g"}) == 1

    with caplog.at_level(logging.INFO, DAEMON_LOG):
        asyncio.run(scenario())
    store.close()
    assert "round t0: 0/1 path ok in " in caplog.text
    assert "direct=connection_refused@connect" in caplog.text
    assert [(r["target"], r["ok"]) for r in rows(config.store.path)] == [("t0", 0)]


def test_at_stop_no_round_starts_and_the_drain_cancels_what_outlives_it(tmp_path: Path, silent_port: int) -> None:
    body = f'[[targets]]\nname = "hangs"\ngroup = "g"\nkind = "tls"\nhost = "{LOOPBACK}"\nport = {silent_port}\n\n'
    config = load_config(config_with(tmp_path, body + DIRECT))
    store = open_store(config.store.path)

    async def scenario() -> float:
        metrics, stopping = Metrics(), asyncio.Event()
        writer = StoreWriter(store, metrics, max_buffer=1000, retry_s=0.1)
        rounds = Rounds(ProbeContext.build(config), writer, metrics, stopping)
        unit = unit_of(config)
        hanging = asyncio.ensure_future(rounds.run(unit))
        await asyncio.sleep(0.3)  # mid-handshake: the probe's timeout is 5 s
        stopping.set()
        await rounds.run(unit)  # does nothing
        started = time.monotonic()
        await rounds.drain(0.2)
        assert hanging.cancelled()
        assert writer.buffered == 0
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 4
    store.close()


# Reloads (probe/daemon/reload.py)


def test_signals_during_a_reload_make_one_more_reload(tmp_path: Path, closed_port: int) -> None:
    path = config_with(tmp_path, tcp_targets(closed_port, "t0") + DIRECT)
    config = load_config(path)
    applied: list[Config] = []

    async def scenario() -> None:
        reloader = Reloader(path, config, ProbeContext.build(config))

        def apply(new: Config, ctx: ProbeContext) -> None:
            applied.append(new)
            if len(applied) == 1:
                for _ in range(5):  # a burst of SIGHUPs while the first reload applies
                    reloader.want()

        for _ in range(5):
            reloader.want()  # a burst before the first
        running = asyncio.ensure_future(reloader.run(apply))
        deadline = time.monotonic() + 30
        while len(applied) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # time enough for more reloads, were any queued
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    asyncio.run(scenario())
    assert len(applied) == 2


def test_a_reload_keeps_the_running_config_when_the_new_one_is_invalid_and_store_and_metrics_until_restart(
    tmp_path: Path, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    path = config_with(tmp_path, tcp_targets(closed_port, "t0") + DIRECT)
    config = load_config(path)
    good = path.read_text()
    applied: list[Config] = []

    async def scenario() -> tuple[bool, bool]:
        reloader = Reloader(path, config, ProbeContext.build(config))
        path.write_text(good.replace('kind = "direct"', 'kind = "vpn"'))
        refused = await reloader.reload(lambda new, ctx: applied.append(new))
        path.write_text(good.replace("[store]", "[store]\nkeep_raw_days = 3") + tcp_targets(closed_port, "t1"))
        taken = await reloader.reload(lambda new, ctx: applied.append(new))
        return refused, taken

    with caplog.at_level(logging.INFO, DAEMON_LOG):
        assert asyncio.run(scenario()) == (False, True)
    assert "keeping the running config" in caplog.text and "'vpn'" in caplog.text
    assert "[store] changed; that takes effect at the next restart" in caplog.text
    assert [t.name for t in applied[0].targets] == ["t0", "t1"] and applied[0].store == config.store
    assert "reloaded" in caplog.text and ": 2 targets, 1 path\n" in caplog.text


# Child jobs (probe/daemon/jobs.py)


def test_a_child_jobs_log_line_keeps_its_last_line_or_its_last_lines_and_exit_code() -> None:
    lines = b"".join(f"line {i}\n".encode() for i in range(9))
    assert outcome("compaction", 0, lines) == (logging.INFO, "compaction: line 8")
    assert outcome("compaction", 0, b"") == (logging.INFO, "compaction: done")
    level, message = outcome("weekly report", 2, lines)
    kept = [f"line {i}" for i in range(9 - ERROR_LINES, 9)]
    assert level == logging.ERROR and message == f"weekly report failed (exit 2): {' | '.join(kept)}"


def test_a_failing_child_job_is_logged_and_the_daemon_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The real command in a child process: a config that is gone fails it with exit 2."""
    missing = tmp_path / "gone.toml"
    with caplog.at_level(logging.INFO, DAEMON_LOG):
        assert asyncio.run(ChildJobs(missing).run("compaction", "store", "compact")) is False
    assert "compaction failed (exit 2): " in caplog.text and str(missing) in caplog.text


# The forwarding loop (probe/daemon/forwarding.py)


def _spool_with_rounds(config: Config, count: int) -> None:
    """`count` rounds of the config's one target in its store, as the daemon writes them."""

    async def rounds() -> None:
        metrics = Metrics()
        store = open_store(config.store.path)
        writer = StoreWriter(store, metrics, max_buffer=1000, retry_s=0.1)
        probing = Rounds(ProbeContext.build(config), writer, metrics, asyncio.Event())
        for _ in range(count):
            await probing.run(unit_of(config))
        assert await writer.flush()
        store.close()

    asyncio.run(rounds())


def _forwarding_waits(
    tmp_path: Path, closed_port: int, waits: list[float], every_s: float, count: int
) -> tuple[list[float], Metrics]:
    """The first `count` waits of the forwarding loop (every `every_s`) against a central
    store that is not there, and its metrics."""
    url = f"postgresql://tunnelwatch@{LOOPBACK}:{free_port()}/fleet"
    config = load_config(
        config_with(
            tmp_path, tcp_targets(closed_port, "t0") + DIRECT, store=f'url = "{url}"\nforward_every_s = {every_s}'
        )
    )
    _spool_with_rounds(config, 3)

    def asked() -> list[float]:
        return [wait for wait in waits if wait != 0.001]

    async def scenario() -> Metrics:
        metrics = Metrics()
        waits.clear()  # those of the rounds above
        async with forwarding(config, metrics) as uploads:
            assert uploads is not None
            loop = asyncio.ensure_future(uploads.run())
            while len(asked()) < count:
                await asyncio.sleep(0.001)  # (in waits too)
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
        return metrics

    metrics = asyncio.run(scenario())
    return asked()[:count], metrics


def test_the_forwarding_loop_backs_off_while_the_central_store_fails(
    tmp_path: Path, closed_port: int, waits: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, DAEMON_LOG):
        asked, metrics = _forwarding_waits(tmp_path, closed_port, waits, every_s=2, count=4)
    assert asked == [2, 4, 8, 16]  # every forward_every_s, then twice as long after each failure
    errors = metrics.registry.get_sample_value("tunnelwatch_forward_errors_total")
    assert errors is not None and errors >= 3
    assert caplog.text.count("measurements stay in the spool") == 1  # one line for the outage
    assert metrics.registry.get_sample_value("tunnelwatch_forward_backlog_measurements") == 3


def test_the_forwarding_waits_five_minutes_at_most_after_a_failure(
    tmp_path: Path, closed_port: int, waits: list[float]
) -> None:
    asked, _ = _forwarding_waits(tmp_path, closed_port, waits, every_s=200, count=3)
    assert asked == [200, 300, 300]  # twice 200 s is over the bound of five minutes


def test_the_forwarding_logs_an_outage_once_and_its_end(
    tmp_path: Path, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    with cluster() as server:
        url = server.database("fleet")
        config = load_config(config_with(tmp_path, tcp_targets(closed_port, "t0") + DIRECT, store=f'url = "{url}"'))
        _spool_with_rounds(config, 2)

        async def scenario() -> tuple[list[bool], Metrics]:
            metrics = Metrics()
            async with forwarding(config, metrics) as uploads:
                assert uploads is not None
                server.stop()
                tries = [await uploads.once(), await uploads.once()]
                server.start()
                tries += [await uploads.once(), await uploads.once()]
            return tries, metrics

        with caplog.at_level(logging.INFO, DAEMON_LOG):
            tries, metrics = asyncio.run(scenario())
    assert tries == [False, False, True, True]
    assert caplog.text.count("measurements stay in the spool") == 1
    assert caplog.text.count("reachable again after") == 1
    assert metrics.registry.get_sample_value("tunnelwatch_forwarded_measurements_total") == 2
    assert metrics.registry.get_sample_value("tunnelwatch_forward_backlog_measurements") == 0


# The loop watch (probe/daemon/watchdog.py)


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


def test_the_loop_watch_pets_the_watchdog_and_measures_the_lag(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # a ping every second
    metrics = Metrics()

    async def scenario() -> float | None:
        watch = asyncio.ensure_future(watch_loop(metrics))
        await asyncio.sleep(0.05)
        time.sleep(1.5)  # the loop held up: the watch wakes half a second late
        assert await asyncio.to_thread(notify_socket.recv, 64) == b"WATCHDOG=1"
        lag = metrics.registry.get_sample_value("tunnelwatch_event_loop_lag_seconds")  # before the next check
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        return lag

    lag = asyncio.run(scenario())
    assert lag is not None and lag >= 0.3


# The metrics table (probe/daemon/metrics.py)


def test_every_metric_of_the_table_is_an_attribute_of_its_type_and_exposed() -> None:
    declared = typing.get_type_hints(Metrics)
    assert set(declared) == set(METRICS)
    metrics = Metrics()
    for attribute, (kind, _, _, _) in METRICS.items():
        assert declared[attribute] is kind and isinstance(getattr(metrics, attribute), kind), attribute
    assert {family.name for family in metrics.registry.collect()} == {name for _, name, _, _ in METRICS.values()}


# The lifecycle (probe/daemon/daemon.py)


def test_the_daemon_stops_on_sigterm_and_closes_every_part(
    tmp_path: Path, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    path = config_with(tmp_path, tcp_targets(closed_port, "t0") + DIRECT, probe="interval_s = 0.5")
    config = load_config(path)
    host, port = config.metrics.host_port

    async def scenario() -> int:
        daemon = asyncio.ensure_future(serve(config, path))
        deadline = time.monotonic() + 30
        while not daemon.done() and time.monotonic() < deadline:
            if config.store.path.exists() and len(rows(config.store.path, "heartbeats")) >= 2:
                os.kill(os.getpid(), signal.SIGTERM)  # the daemon's handler, not pytest's end
                break
            await asyncio.sleep(0.05)
        return await asyncio.wait_for(daemon, 30)

    with caplog.at_level(logging.INFO, DAEMON_LOG):
        assert asyncio.run(scenario()) == 0
    assert "probing 1 target through 1 path into" in caplog.text and "stopped" in caplog.text
    lock = StoreLock(config.store.path)
    lock.acquire()  # released
    lock.release()
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, port), timeout=5):
        pass  # the metrics endpoint is closed
    with sqlite3.connect(config.store.path) as db:
        stored = db.execute("SELECT count(*) FROM measurements").fetchone()[0]
    assert stored == len(rows(config.store.path, "heartbeats")) >= 2  # every round written before the exit


def test_a_child_job_running_when_the_daemon_stops_goes_with_it(tmp_path: Path) -> None:
    """Cancelled (the daemon stops), the job terminates its child and reaps it: no process
    outlives the daemon, no pipe is left open."""
    import asyncio
    import os
    import sys

    from probe.daemon.jobs import ChildJobs

    pid_file = tmp_path / "child.pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    jobs = ChildJobs(None, command=(sys.executable, "-c", script))

    async def main() -> None:
        task = asyncio.create_task(jobs.run("a long job"))
        for _ in range(200):  # until the child is up: 20 s at most
            if pid_file.exists() and pid_file.read_text():
                break
            await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
