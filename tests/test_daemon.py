"""`tunnelwatch run` as a real subprocess against loopback servers, at a 1 s interval."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from probe.config import load_config
from tests.analysis_data import realistic_week
from tests.conftest import rows, write_config
from tests.daemonproc import TUNNELWATCH, Daemon, fast, scrape
from tests.servers import LOOPBACK


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            return messages


def test_daemon_probes_every_target_on_schedule_and_stops_cleanly(
    config_file: Path, daemons: Callable[..., Daemon], notify_socket: socket.socket
) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "1000000"}
    daemon = daemons(fast(config_file), env)
    targets = {"page", "control-page", "down", "shadowsocks-endpoint"}
    daemon.wait_until(lambda: sum(h["target"] == "down" for h in daemon.heartbeats()) >= 3, what="3 rounds")
    assert daemon.stop() == 0, daemon.output()
    beats = daemon.heartbeats()
    assert {h["target"] for h in beats} == targets
    for target in targets:
        starts = sorted(h["scheduled_at_ms"] for h in beats if h["target"] == target)
        assert all(b - a == 1000 for a, b in zip(starts, starts[1:], strict=False)), starts  # on the grid
        late = [h["started_at_ms"] - h["scheduled_at_ms"] for h in beats if h["target"] == target]
        assert all(0 <= ms < 500 for ms in late), late
    stored = rows(daemon.db)
    assert len(stored) == sum(h["probes"] for h in beats)  # every finished round was flushed
    assert {r["round_id"] for r in stored} == {h["round_id"] for h in beats}
    messages = received(notify_socket)
    assert messages[0] == "READY=1" and "WATCHDOG=1" in messages and "STOPPING=1" in messages
    assert "round down: 1/2 paths ok" in daemon.output() and "direct=connection_refused@connect" in daemon.output()
    assert "stopped" in daemon.output()


def test_metrics_match_the_stored_rows(config_file: Path, daemons: Callable[..., Daemon]) -> None:
    daemon = daemons(fast(config_file))
    daemon.wait_until(lambda: len({h["target"] for h in daemon.heartbeats()}) == 4, what="every target once")
    before = len(daemon.heartbeats())
    metrics = scrape(daemon.config)
    assert daemon.stop() == 0
    newest = {(r["target"], r["path"]): r for r in rows(daemon.db)}
    for (target, path), row in newest.items():
        labels = (("group", row["grp"]), ("kind", row["kind"]), ("path", path), ("target", target))
        assert metrics[("probe_success", labels)] == row["ok"], (target, path)
        assert metrics[("probe_duration_seconds", labels)] > 0
    page = (("group", "blocked"), ("kind", "http"), ("path", "direct"), ("target", "page"))
    for phase in ("resolve", "connect", "tls", "first_byte"):
        assert (
            metrics[
                ("probe_phase_duration_seconds", (*page[:2], ("path", "direct"), ("phase", phase), ("target", "page")))
            ]
            > 0
        )
    rounds = sum(v for (name, _), v in metrics.items() if name == "tunnelwatch_rounds_total")
    assert before <= rounds <= len(daemon.heartbeats())
    for name in (
        "tunnelwatch_event_loop_lag_seconds",
        "tunnelwatch_schedule_lag_seconds_count",
        "tunnelwatch_store_write_seconds_count",
        "tunnelwatch_round_duration_seconds_count",
    ):
        assert any(key[0] == name for key in metrics), name


def test_sighup_reloads_a_good_config_and_keeps_running_on_a_bad_one(
    config_file: Path, daemons: Callable[..., Daemon]
) -> None:
    daemon = daemons(fast(config_file))
    daemon.wait_until(lambda: len(daemon.heartbeats()) >= 2, what="rounds")
    good = config_file.read_text()
    config_file.write_text(good.replace('kind = "direct"', 'kind = "vpn"'))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_until(lambda: "keeping the running config" in daemon.output(), what="the refusal")
    assert "paths[0].kind" in daemon.output() and "'vpn'" in daemon.output()
    count = len(daemon.heartbeats())
    daemon.wait_until(lambda: len(daemon.heartbeats()) >= count + 3, what="rounds after the bad reload")
    added = '\n[[targets]]\nname = "added"\ngroup = "control"\nkind = "tcp"\nhost = "127.0.0.1"\nport = 9\n'
    config_file.write_text(good + added)
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_until(lambda: any(h["target"] == "added" for h in daemon.heartbeats()), what="the new target")
    assert daemon.stop() == 0
    assert "reloaded" in daemon.output()


def tcp_targets(names: list[str], group: str, port: int) -> str:
    return "".join(
        f'[[targets]]\nname = "{name}"\ngroup = "{group}"\nkind = "tcp"\nhost = "{LOOPBACK}"\nport = {port}\n\n'
        for name in names
    )


def refused_targets(tmp_path: Path, port: int, interval_s: float, count: int = 5) -> Path:
    """`count` targets of one group, each a round of one refused connection: a few ms."""
    body = tcp_targets([f"t{i}" for i in range(count)], "g", port) + '[[paths]]\nname = "direct"\nkind = "direct"\n'
    config = write_config(tmp_path, body)
    config.write_text(config.read_text().replace("[probe]", f"[probe]\ninterval_s = {interval_s}"))
    return config


def longest_gaps(daemon: Daemon, since: float, until: float) -> dict[str, float]:
    """The longest time (s) each target went without starting a round between since and until."""
    starts: dict[str, list[float]] = {}
    for beat in daemon.heartbeats():
        starts.setdefault(beat["target"], []).append(beat["started_at_ms"] / 1000)
    gaps = {}
    for target, times in starts.items():
        points = [since, *sorted(t for t in times if since < t < until), until]
        gaps[target] = max(b - a for a, b in zip(points, points[1:], strict=False))
    return gaps


def hup_for(daemon: Daemon, seconds: float, every_s: float) -> tuple[float, float]:
    since = time.time()
    while time.time() - since < seconds:
        daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(every_s)
    return since, time.time()


def test_reloads_every_third_of_an_interval_starve_no_target(
    tmp_path: Path, daemons: Callable[..., Daemon], closed_port: int
) -> None:
    interval = 2.0
    daemon = daemons(refused_targets(tmp_path, closed_port, interval))
    daemon.wait_until(lambda: "probing 5 targets" in daemon.output(), what="the daemon to start")
    since, until = hup_for(daemon, 9, interval / 3)
    assert daemon.stop() == 0, daemon.output()
    assert daemon.output().count("SIGHUP: reloaded") >= 5
    gaps = longest_gaps(daemon, since, until)
    assert set(gaps) == {f"t{i}" for i in range(5)}, gaps  # every target ran
    assert all(gap < interval + 3 for gap in gaps.values()), gaps


def test_reloads_do_not_push_compaction_back(tmp_path: Path, daemons: Callable[..., Daemon], closed_port: int) -> None:
    config = refused_targets(tmp_path, closed_port, 2, count=1)
    config.write_text(config.read_text() + "\n[daemon]\ncompact_every_s = 3\n")
    daemon = daemons(config)
    daemon.wait_until(lambda: "probing 1 target " in daemon.output(), what="the daemon to start")
    deadline = time.monotonic() + 20  # the compaction's child process takes seconds on a busy machine
    while "compaction: " not in daemon.output():
        assert time.monotonic() < deadline, daemon.output()
        daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(0.7)
    assert daemon.stop() == 0, daemon.output()


def test_a_burst_of_reloads_delays_no_target(tmp_path: Path, daemons: Callable[..., Daemon], closed_port: int) -> None:
    interval = 2.0
    daemon = daemons(refused_targets(tmp_path, closed_port, interval))
    daemon.wait_until(lambda: "probing 5 targets" in daemon.output(), what="the daemon to start")
    since, until = hup_for(daemon, 8, 0.1)
    assert daemon.stop() == 0, daemon.output()
    assert daemon.output().count("SIGHUP: reloaded") >= 5  # signals during a reload make one more
    gaps = longest_gaps(daemon, since, until)
    assert set(gaps) == {f"t{i}" for i in range(5)}, gaps
    assert all(gap < interval + 3 for gap in gaps.values()), gaps


def test_the_first_target_is_probed_at_start(tmp_path: Path, daemons: Callable[..., Daemon], closed_port: int) -> None:
    """At a 30 s interval the first of three targets runs at once, the others 10 s and 20 s later."""
    started = time.time()
    daemon = daemons(refused_targets(tmp_path, closed_port, 30, count=3))
    daemon.wait_until(lambda: len(daemon.heartbeats()) >= 1, timeout_s=15, what="a first round")
    beats = daemon.heartbeats()
    assert [h["target"] for h in beats] == ["t0"]
    assert beats[0]["started_at_ms"] / 1000 - started < 8
    assert daemon.stop() == 0, daemon.output()


def test_a_reload_reschedules_changed_targets_and_keeps_the_others(
    tmp_path: Path, daemons: Callable[..., Daemon], closed_port: int, silent_port: int
) -> None:
    """A reload changes group "slow"'s interval and one of its targets, and adds a target to
    group "steady": the changed ones run on their new interval, the added one runs, and the
    unchanged one stays on its grid."""
    config = write_config(tmp_path, '[[paths]]\nname = "direct"\nkind = "direct"\n')
    template = config.read_text()

    def write(slow_s: float, targets: str) -> None:
        probe = f"[probe]\ninterval_s = 2\ngroup_intervals_s = {{ slow = {slow_s} }}"
        config.write_text(template.replace("[probe]", probe) + targets)

    write(60, tcp_targets(["steady"], "steady", closed_port) + tcp_targets(["s0", "s1"], "slow", closed_port))
    daemon = daemons(config)
    daemon.wait_until(lambda: sum(h["target"] == "steady" for h in daemon.heartbeats()) >= 2, what="2 steady rounds")
    write(
        1,
        tcp_targets(["steady", "added"], "steady", closed_port)
        + tcp_targets(["s0"], "slow", silent_port)
        + tcp_targets(["s1"], "slow", closed_port),
    )
    daemon.proc.send_signal(signal.SIGHUP)
    reloaded = time.time()
    daemon.wait_until(lambda: "SIGHUP: reloaded" in daemon.output(), what="the reload")

    def count(target: str) -> int:
        return sum(h["target"] == target for h in daemon.heartbeats())

    daemon.wait_until(lambda: count("s1") >= 4 and count("added") >= 2 and count("steady") >= 5, what="rounds")
    assert daemon.stop() == 0, daemon.output()
    beats = daemon.heartbeats()

    def grid(target: str) -> list[int]:
        starts = sorted(h["scheduled_at_ms"] for h in beats if h["target"] == target)
        return [b - a for a, b in zip(starts, starts[1:], strict=False)]

    assert set(grid("steady")) == {2000}, grid("steady")  # the reload did not move it
    assert set(grid("added")) == {2000}, grid("added")
    assert grid("s1")[-2:] == [1000, 1000], grid("s1")  # the new interval
    first_added = min(h["started_at_ms"] for h in beats if h["target"] == "added") / 1000
    assert first_added - reloaded < 2 + 3
    s0 = [r for r in rows(daemon.db) if r["target"] == "s0" and r["started_at_ms"] / 1000 > reloaded]
    assert s0 and all(r["ok"] for r in s0), s0  # the changed definition: an open port now


def test_sigterm_mid_round_lets_the_round_finish_and_stores_it(
    config_file: Path, daemons: Callable[..., Daemon], silent_port: int
) -> None:
    hanging = (
        f'\n[[targets]]\nname = "hangs"\ngroup = "slow"\nkind = "tls"\nhost = "{LOOPBACK}"\nport = {silent_port}\n'
        "timeout_s = 3\n"
    )
    daemon = daemons(fast(config_file, hanging))
    daemon.wait_until(lambda: "round page" in daemon.output(), what="a first round")
    time.sleep(1.2)  # "hangs" is now mid-probe: its probes take 3 s
    started = time.monotonic()
    assert daemon.stop() == 0, daemon.output()
    assert time.monotonic() - started < 8
    assert "letting" in daemon.output()
    hung = [r for r in rows(daemon.db) if r["target"] == "hangs"]
    assert hung and {r["failure"] for r in hung} == {"generic_timeout_error"}
    assert {r["failed_operation"] for r in hung} == {"tls_handshake"}


def test_a_second_signal_exits_at_once(config_file: Path, daemons: Callable[..., Daemon], silent_port: int) -> None:
    hanging = (
        f'\n[[targets]]\nname = "hangs"\ngroup = "slow"\nkind = "tcp"\nhost = "{LOOPBACK}"\nport = {silent_port}\n'
        "timeout_s = 60\n[[targets]]\n"
        f'name = "hangs2"\ngroup = "slow"\nkind = "tls"\nhost = "{LOOPBACK}"\nport = {silent_port}\ntimeout_s = 60\n'
    )
    daemon = daemons(fast(config_file, hanging.replace("[probe]", "")))
    daemon.wait_until(lambda: "round page" in daemon.output(), what="a first round")
    time.sleep(1.5)
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.wait_until(lambda: "letting" in daemon.output(), what="draining")
    started = time.monotonic()
    assert daemon.stop(signal.SIGINT) == 1
    assert time.monotonic() - started < 3


def test_kill_9_then_restart_keeps_the_store_and_continues(config_file: Path, daemons: Callable[..., Daemon]) -> None:
    first = daemons(fast(config_file))
    first.wait_until(lambda: len(first.heartbeats()) >= 4, what="rounds")
    first.stop(signal.SIGKILL)
    conn = sqlite3.connect(first.db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    count = len(first.heartbeats())
    second = daemons(config_file)
    second.wait_until(lambda: len(second.heartbeats()) >= count + 4, what="rounds after the restart")
    assert second.stop() == 0


def test_a_second_daemon_on_the_same_store_is_refused(config_file: Path, daemons: Callable[..., Daemon]) -> None:
    first = daemons(fast(config_file))
    first.wait_until(lambda: len(first.heartbeats()) >= 1, what="a round")
    other = config_file.with_name("other.toml")
    other.write_text(config_file.read_text().replace(load_config(config_file).metrics.listen, f"{LOOPBACK}:0"))
    second = subprocess.run([*TUNNELWATCH, "run", "--config", str(other)], capture_output=True, text=True, timeout=30)
    assert second.returncode == 2
    assert f"another tunnelwatch daemon (pid {first.proc.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.proc.poll() is None and first.stop() == 0


def test_a_locked_store_loses_nothing(config_file: Path, daemons: Callable[..., Daemon]) -> None:
    daemon = daemons(fast(config_file, "\n[daemon]\nstore_retry_s = 0.5\n"))
    daemon.wait_until(lambda: len(daemon.heartbeats()) >= 2, what="rounds")
    blocker = sqlite3.connect(daemon.db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another program holds the file: every write fails
    time.sleep(8)
    blocker.execute("ROLLBACK")
    blocker.close()
    daemon.wait_until(lambda: "store writable again" in daemon.output(), what="recovery")
    assert daemon.stop() == 0
    assert "database is locked" in daemon.output()
    beats = daemon.heartbeats()
    for target in {h["target"] for h in beats}:
        starts = sorted(h["scheduled_at_ms"] for h in beats if h["target"] == target)
        assert all(b - a == 1000 for a, b in zip(starts, starts[1:], strict=False)), (target, starts)
    assert len(rows(daemon.db)) == sum(h["probes"] for h in beats)


def test_the_daemon_compacts_its_store_while_it_probes(config_file: Path, daemons: Callable[..., Daemon]) -> None:
    """A store holding an old week: the hourly compaction (here every 2 s) summarises it and
    deletes its raw rows, while the daemon's own rounds keep landing."""
    db = load_config(config_file).store.path
    realistic_week(db)
    old = len(rows(db))
    probes = sum(1 for r in rows(db) if r["grp"] != "endpoint")  # what the summaries count
    text = config_file.read_text().replace("[store]", "[store]\nkeep_raw_days = 1")
    config_file.write_text(text)
    daemon = daemons(fast(config_file, "\n[daemon]\ncompact_every_s = 2\n"))
    daemon.wait_until(lambda: "compaction: summarised" in daemon.output(), what="a compaction")
    daemon.wait_until(lambda: len(daemon.heartbeats()) >= 8, what="rounds after it")
    assert daemon.stop() == 0
    assert re.search(r"compaction: summarised \d+ hours; deleted \d+ raw", daemon.output())
    beats = daemon.heartbeats()
    assert all(h["started_at_ms"] > time.time() * 1000 - 3600_000 for h in beats)  # 2018's are summarised
    assert len(rows(db)) == sum(h["probes"] for h in beats) < old
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM verdict_runs").fetchone()[0] > 0
        summarised = conn.execute("SELECT SUM(probes) FROM hourly").fetchone()[0]
    assert summarised == probes


def test_status_reads_the_store(config_file: Path, daemons: Callable[..., Daemon]) -> None:
    daemon = daemons(fast(config_file))
    daemon.wait_until(lambda: len({h["target"] for h in daemon.heartbeats()}) == 4, what="every target once")
    assert daemon.stop() == 0
    result = subprocess.run([*TUNNELWATCH, "status", "--config", str(config_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "last heartbeat:" in result.stdout and "ago" in result.stdout
    assert "connection_refused" in result.stdout  # the last failure of "down"
    assert "partial" in result.stdout  # direct: page ok, down failing


def _resources(pid: int) -> tuple[int, int]:
    """(open descriptors, resident set in KiB) of a process, from /proc. Probes in flight hold
    sockets for a moment, so the fewest descriptors seen over two seconds is what stays open."""
    fds = []
    for _ in range(20):
        fds.append(len(os.listdir(f"/proc/{pid}/fd")))
        time.sleep(0.1)
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return min(fds), rss_kib


def test_memory_and_descriptors_stay_flat_over_hundreds_of_failing_rounds(
    config_file: Path, daemons: Callable[..., Daemon], silent_port: int
) -> None:
    hanging = (
        f'\n[[targets]]\nname = "hangs"\ngroup = "control"\nkind = "http"\n'
        f'url = "http://{LOOPBACK}:{silent_port}/"\ntimeout_s = 0.2\n'
        f'\n[[targets]]\nname = "hangs-tls"\ngroup = "control"\nkind = "tls"\nhost = "{LOOPBACK}"\n'
        f"port = {silent_port}\ntimeout_s = 0.2\n"
    )
    text = config_file.read_text().replace("[probe]", "[probe]\ninterval_s = 0.25")
    config_file.write_text(text + hanging)
    daemon = daemons(config_file)
    daemon.wait_until(lambda: len(daemon.heartbeats()) >= 150, what="warm-up rounds")
    start = _resources(daemon.proc.pid)
    warm = len(daemon.heartbeats())
    daemon.wait_until(lambda: len(daemon.heartbeats()) >= warm + 800, timeout_s=120, what="800 more rounds")
    end = _resources(daemon.proc.pid)
    assert daemon.stop() == 0
    assert end[0] - start[0] <= 2, (start, end)
    assert end[1] - start[1] < 8 * 1024, (start, end)  # KiB
    failures = {r["failure"] for r in rows(daemon.db) if r["target"].startswith("hangs")}
    assert "generic_timeout_error" in failures


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs that the test can fill up, as a disk fills up."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_loses_nothing(config_file: Path, daemons: Callable[..., Daemon], small_disk: Path) -> None:
    store = small_disk / "tw.db"
    text = config_file.read_text().replace(str(load_config(config_file).store.path), str(store))
    config_file.write_text(text)
    daemon = daemons(fast(config_file, "\n[daemon]\nstore_retry_s = 0.5\n"))
    daemon.wait_until(lambda: len(daemon.heartbeats()) >= 2, what="rounds")
    filler = small_disk / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, check=False)
    daemon.wait_until(lambda: "disk is full" in daemon.output(), what="a full disk")
    time.sleep(2)
    filler.unlink()
    daemon.wait_until(lambda: "store writable again" in daemon.output(), what="recovery")
    assert daemon.stop() == 0
    beats = daemon.heartbeats()
    for target in {h["target"] for h in beats}:
        starts = sorted(h["scheduled_at_ms"] for h in beats if h["target"] == target)
        assert all(b - a == 1000 for a, b in zip(starts, starts[1:], strict=False)), (target, starts)
    assert len(rows(store)) == sum(h["probes"] for h in beats)


def test_shipped_systemd_unit_matches_what_the_daemon_does() -> None:
    import configparser

    from probe.config import default_config_path

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(default_config_path().with_name("tunnelwatch.service"))
    service = unit["Service"]
    assert service["Type"] == "notify"  # the daemon sends READY=1 (tested above)
    assert service["ExecReload"].endswith("-HUP $MAINPID")  # SIGHUP reloads (tested above)
    assert service["ExecStart"].split()[1:3] == ["run", "--config"]
    assert int(service["WatchdogSec"]) > 1 and service["Restart"] == "on-failure"
    assert service["User"] != "root"


def test_json_logs_are_json_and_never_show_secrets(config_file: Path, closed_port: int) -> None:
    import json

    secret_path = (
        f'\n[[paths]]\nname = "socks-secret"\nkind = "socks5"\nhost = "{LOOPBACK}"\nport = {closed_port}\n'
        'username = "${TW_LOG_USER}"\npassword = "${TW_LOG_PASSWORD}"\n'
    )
    config = fast(config_file, secret_path)
    env = {"TW_LOG_USER": "log-user-name", "TW_LOG_PASSWORD": "log-password-value"}
    proc = subprocess.Popen(
        [*TUNNELWATCH, "run", "--log-json", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    try:
        time.sleep(4)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    entries = [json.loads(line) for line in stderr.splitlines()]
    assert any("socks-secret=connection_refused@proxy_connect" in e["message"] for e in entries)
    assert "log-password-value" not in stderr and "log-user-name" not in stderr
