"""A store deleted or damaged under tunnelwatch. The daemon notices, says so, counts it and
measures on into a fresh store at store.path; every other command refuses a damaged store
(exit 2, the file named, no traceback) and leaves it as it is."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from probe.config import load_config
from tests.analysis_data import realistic_week
from tests.conftest import rows, write_config
from tests.daemonproc import Daemon, scrape
from tests.servers import LOOPBACK

TUNNELWATCH = [sys.executable, "-m", "probe"]
REOPENED = "tunnelwatch_store_reopened_total"


@pytest.fixture
def daemons() -> Iterator[Callable[[Path], Daemon]]:
    started: list[Daemon] = []

    def start(config: Path) -> Daemon:
        started.append(Daemon(config))
        return started[-1]

    yield start
    for daemon in started:
        daemon.kill()


def refused_config(tmp_path: Path, port: int, interval_s: float = 300) -> Path:
    """Three targets whose rounds are one refused loopback connection each: a few ms."""
    body = (
        "".join(
            f'[[targets]]\nname = "t{i}"\ngroup = "g"\nkind = "tcp"\nhost = "{LOOPBACK}"\nport = {port}\n\n'
            for i in range(3)
        )
        + '[[paths]]\nname = "direct"\nkind = "direct"\n'
    )
    config = write_config(tmp_path, body)
    config.write_text(config.read_text().replace("[probe]", f"[probe]\ninterval_s = {interval_s}"))
    return config


@pytest.fixture(scope="module")
def week(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A realistic store: a week of 5-minute rounds, some 5 MB, mostly measurement pages."""
    db = tmp_path_factory.mktemp("week") / "week.db"
    realistic_week(db)
    return db


def damaged_copy(week: Path, db: Path, where: str) -> str:
    """The week at `db` with 8 KiB of random bytes over its first page ("header") or in its
    middle ("middle": table pages, which the quick look at open does not read). Its sha256."""
    shutil.copy(week, db)
    with db.open("r+b") as f:
        f.seek(0 if where == "header" else db.stat().st_size // 2 + 1000)
        f.write(random.Random(12).randbytes(8192))
    return sha256(db)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reopened(config: Path, reason: str) -> float:
    return scrape(config)[(REOPENED, (("reason", reason),))]


def grid_starts(db: Path) -> dict[str, list[int]]:
    starts: dict[str, list[int]] = {}
    for beat in rows(db, "heartbeats"):
        starts.setdefault(beat["target"], []).append(beat["scheduled_at_ms"])
    return {target: sorted(times) for target, times in starts.items()}


@pytest.mark.parametrize("removed", [("",), ("", "-wal", "-shm", ".lock")], ids=["the-file", "with-wal-and-lock"])
def test_a_store_deleted_under_the_daemon_is_recreated_and_every_round_after_lands_in_it(
    tmp_path: Path, daemons: Callable[[Path], Daemon], closed_port: int, removed: tuple[str, ...]
) -> None:
    config = refused_config(tmp_path, closed_port, interval_s=1)
    daemon = daemons(config)
    daemon.wait_until(lambda: len(daemon.heartbeats()) >= 6, what="rounds")
    before = grid_starts(daemon.db)
    for suffix in removed:
        Path(f"{daemon.db}{suffix}").unlink(missing_ok=True)
    daemon.wait_until(lambda: "was deleted" in daemon.output(), what="the deletion noticed")
    noticed = len(daemon.output())
    daemon.wait_until(lambda: len(daemon.heartbeats()) >= 6, what="rounds in the new store")
    assert reopened(config, "deleted") == 1
    if ".lock" in removed:  # the lock followed the store: a second daemon is still refused
        other = config.with_name("other.toml")
        other.write_text(config.read_text().replace(load_config(config).metrics.listen, f"{LOOPBACK}:0"))
        second = subprocess.run(
            [*TUNNELWATCH, "run", "--config", str(other)], capture_output=True, text=True, timeout=30
        )
        assert second.returncode == 2 and f"(pid {daemon.proc.pid})" in second.stderr, second.stderr
    assert daemon.stop() == 0, daemon.output()
    log = daemon.output()
    assert f"{daemon.db}: the store file was deleted while tunnelwatch had it open" in log
    after = grid_starts(daemon.db)
    logged = log[noticed:].count("tunnelwatch.daemon: round ")  # rounds submitted after the deletion was noticed
    assert sum(map(len, after.values())) >= logged > 0
    for target, starts in after.items():
        assert all(b - a == 1000 for a, b in zip(starts, starts[1:], strict=False)), (target, starts)
        # The round after the last one read before the deletion is in the new store (or, if it
        # was written in the instant between, went with the deleted file): none is lost after.
        assert starts[0] - before[target][-1] in (1000, 2000), (target, before[target], starts)
    assert len(rows(daemon.db)) == sum(beat["probes"] for beat in rows(daemon.db, "heartbeats"))
    assert [p["name"] for p in rows(daemon.db, "paths")] == ["direct"]  # the fresh schema knows the paths


COMMANDS = {
    "status": ["status"],
    "outages": ["outages"],
    "events-check": ["events", "check"],
    "report": ["report", "weekly", "--week", "2018-W10", "--out", "{tmp}/report.html"],
    "chart": ["chart", "weekly", "--week", "2018-W10", "--out", "{tmp}/charts"],
    "compact": ["store", "compact"],
    "probe": ["probe"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("where", ["middle", "header"])
def test_every_command_refuses_a_damaged_store_and_leaves_it_as_it_is(
    tmp_path: Path, week: Path, closed_port: int, where: str, command: str
) -> None:
    config = refused_config(tmp_path, closed_port)
    db = load_config(config).store.path
    digest = damaged_copy(week, db, where)
    args = [arg.format(tmp=tmp_path) for arg in COMMANDS[command]]
    result = subprocess.run([*TUNNELWATCH, *args, "--config", str(config)], capture_output=True, text=True, timeout=120)
    if (command, where) == ("status", "middle"):  # status reads the newest pages only (probe/store/latest.py)
        assert result.returncode == 0 and sha256(db) == digest, result.stderr
        return
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{db}: the store is damaged" in result.stderr, result.stderr
    if command != "compact":  # which may have summarised the sound days before, each in a transaction
        assert sha256(db) == digest


@pytest.mark.parametrize("where", ["middle", "header"])
def test_the_daemon_moves_a_damaged_store_aside_untouched_and_measures_on(
    tmp_path: Path, week: Path, daemons: Callable[[Path], Daemon], closed_port: int, where: str
) -> None:
    config = refused_config(tmp_path, closed_port, interval_s=1)
    db = load_config(config).store.path
    digest = damaged_copy(week, db, where)
    daemon = daemons(config)
    daemon.wait_until(lambda: "is damaged" in daemon.output(), what="the damage noticed")
    daemon.wait_until(lambda: len(daemon.heartbeats()) >= 3, what="rounds in a fresh store")
    assert reopened(config, "damaged") == 1
    assert daemon.stop() == 0, daemon.output()
    (aside,) = [p for p in tmp_path.glob("store.db.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert sha256(aside) == digest  # not a byte appended
    assert f"{db}: the store is damaged" in daemon.output() and f"moved it aside to {aside}" in daemon.output()
    beats = rows(db, "heartbeats")
    assert len(beats) >= 3 and {b["target"] for b in beats} == {"t0", "t1", "t2"}  # only the new rounds
    assert len(rows(db)) == sum(b["probes"] for b in beats)
