"""kill -9, as a power cut or the OOM killer stops the daemon: mid-round, mid-write, mid-upload.

Some kills land at a random moment (os.kill); the others exactly as the daemon begins a write
to its SQLite file, a few writes after a random moment (strace attaches and turns that
pwrite64 into SIGKILL): inside a transaction's commit, or in a checkpoint. The daemon is
started again after each. Then the stores are held against what the daemon logged and
against each other: the logged rounds stored with all their measurements, none half-written,
none twice; the central PostgreSQL equal to the spool, row for row.

The daemon logs a round as it hands it to its writer, a moment before the write: a kill may
take the last rounds logged with it, never one logged before a round that was stored.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from probe.model import Heartbeat, Measurement
from probe.store.central import CentralStore
from probe.store.schema import HEARTBEAT_COLUMNS, MEASUREMENT_COLUMNS
from probe.store.sqlite import SQLiteStore
from tests.daemonproc import TUNNELWATCH
from tests.postgres import cluster
from tests.servers import LOOPBACK, need

# A logged round reaches the store within milliseconds; only rounds logged this close to a
# kill may be lost with it (the writer's batch in flight).
GRACE_MS = 2000
ROUND = re.compile(r"round (?P<target>[\w-]+): (?P<ok>\d+)/(?P<probes>\d+) paths ok")
PATHS = """
[[paths]]
name = "direct"
kind = "direct"

[[paths]]
name = "lo2"
kind = "bind"
address = "127.0.0.2"
"""


@dataclass
class Life:
    """One process of the daemon, from its start until it was killed or stopped."""

    proc: subprocess.Popen[bytes]
    log: Path
    how: str  # how it ends, for messages
    since_ms: int
    until_ms: int = 0

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Lives:
    """The daemon's successive processes on one store; cleanup kills any still running."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.all: list[Life] = []

    def start(self) -> Life:
        log = self.config.with_name(f"life-{len(self.all)}.log")
        with log.open("w") as sink:
            proc = subprocess.Popen(
                [*TUNNELWATCH, "run", "--log-json", "--config", str(self.config)], stderr=sink, start_new_session=True
            )
        life = Life(proc, log, "running", since_ms=_now_ms())
        self.all.append(life)
        return life

    def wait_until(self, life: Life, condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if life.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {life.proc.returncode}: {life.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {life.output()}")
            time.sleep(0.05)

    def kill(self, life: Life, at_write: int | None = None) -> None:
        """kill -9 now, or as the daemon begins a write to a file: strace attaches to each of
        its threads and turns the `at_write`th pwrite64 of one of them into SIGKILL (SQLite
        writes a transaction's pages at its commit, one call for a frame's header, one for
        its page: the count picks a point inside a commit, or one commit into the next)."""
        if at_write is None:
            life.how = "os.kill at a random moment"
            os.kill(life.proc.pid, signal.SIGKILL)
        else:
            trace = life.log.with_suffix(".strace")
            tracer = subprocess.run(
                [
                    need("strace"),
                    "-f",
                    "-qq",
                    "-p",
                    str(life.proc.pid),
                    "-o",
                    str(trace),
                    "-e",
                    "trace=pwrite64",
                    "-e",
                    f"inject=pwrite64:signal=SIGKILL:when={at_write}",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert tracer.returncode == 0, f"strace could not attach: {tracer.stderr}"
            # the killed call's line ends "<unfinished ...>" when another thread's line came between
            *_, write = re.finditer(r"pwrite64\((\d+), .*, (\d+), (\d+)(?:\)| <unfinished)", trace.read_text())
            fd, size, offset = write.groups()
            life.how = f"SIGKILL at its write {at_write} from now ({size} bytes at {offset} of fd {fd})"
        self.died(life)

    def died(self, life: Life, timeout_s: float = 60) -> None:
        """Waits for a kill -9 to have ended the life."""
        try:
            life.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon ({life.how}) still runs after {timeout_s} s: {life.output()}") from None
        life.until_ms = _now_ms()
        assert life.proc.returncode == -signal.SIGKILL, (life.how, life.proc.returncode, life.output())

    def stop(self, life: Life) -> None:
        life.proc.send_signal(signal.SIGTERM)
        assert life.proc.wait(60) == 0, life.output()
        life.until_ms = _now_ms()

    def close(self) -> None:
        for life in self.all:
            if life.proc.poll() is None:
                os.killpg(life.proc.pid, signal.SIGKILL)
                life.proc.wait(10)


@pytest.fixture
def lives() -> Iterator[Callable[[Path], Lives]]:
    made: list[Lives] = []

    def make(config: Path) -> Lives:
        made.append(Lives(config))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port whose kernel completes TCP handshakes (a long queue) and that never answers."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen(4096)
        yield int(sock.getsockname()[1])


def _now_ms() -> int:
    return round(time.time() * 1000)


@dataclass(frozen=True)
class Logged:
    at_ms: int
    target: str
    ok: int
    probes: int


def logged_rounds(life: Life) -> list[Logged]:
    """The rounds the daemon logged, in order (the order it handed them to its writer)."""
    lines = life.log.read_text(errors="replace").splitlines()
    rounds = []
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            assert number == len(lines), f"line {number} is not JSON: {line!r}"  # only the kill may cut a line
            continue
        if match := ROUND.match(entry["message"]):
            at = datetime.fromisoformat(entry["ts"])
            rounds.append(Logged(round(at.timestamp() * 1000), match["target"], int(match["ok"]), int(match["probes"])))
    return rounds


def _query(db: Path, sql: str, *args: Any) -> list[Any]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def stored_since(db: Path, life: Life) -> int:
    return int(_query(db, "SELECT count(*) FROM heartbeats WHERE started_at_ms >= ?", life.since_ms)[0][0])


def check_life(db: Path, life: Life, clean: bool) -> None:
    """The life's logged rounds against its stored heartbeats, target by target in order.
    Only the last rounds logged may be missing (the writer writes in order), only those
    logged within GRACE_MS of the end, and none after a clean stop."""
    logged = logged_rounds(life)
    stored: dict[str, list[sqlite3.Row]] = defaultdict(list)
    for beat in _query(
        db,
        "SELECT * FROM heartbeats WHERE started_at_ms >= ? AND started_at_ms < ? ORDER BY started_at_ms",
        life.since_ms,
        life.until_ms,
    ):
        stored[beat["target"]].append(beat)
    seen: Counter[str] = Counter()
    found = []
    for entry in logged:
        beats, index = stored[entry.target], seen[entry.target]
        seen[entry.target] += 1
        found.append(index < len(beats))
        if found[-1]:
            beat = beats[index]
            assert (beat["succeeded"], beat["probes"]) == (entry.ok, entry.probes), (life.how, entry, dict(beat))
    for target, beats in stored.items():
        assert len(beats) <= seen[target], f"{life.how}: {target} has rounds stored that were never logged"
    cut = found.index(False) if False in found else len(found)
    lost = logged[cut:]
    assert not any(found[cut:]), f"{life.how}: logged round {logged[cut]} is missing, later ones are stored"
    if clean:
        assert not lost, f"stopped cleanly yet {len(lost)} logged rounds are missing: {lost}"
    else:
        old = [entry for entry in lost if entry.at_ms < logged[-1].at_ms - GRACE_MS]
        assert not old, f"{life.how}: {len(old)} rounds logged over {GRACE_MS} ms before the end are missing: {old[0]}"


def check_store(db: Path, after: str) -> None:
    """Whole rounds only, each once."""
    assert _query(db, "PRAGMA integrity_check")[0][0] == "ok", after
    partial = _query(
        db,
        "SELECT h.round_id, h.probes, count(m.id) AS stored FROM heartbeats h LEFT JOIN "
        "measurements m USING (round_id) GROUP BY h.round_id HAVING stored != h.probes",
    )
    assert not partial, f"after {after}: half-written rounds: {[tuple(r) for r in partial]}"
    orphans = _query(
        db, "SELECT DISTINCT round_id FROM measurements WHERE round_id NOT IN (SELECT round_id FROM heartbeats)"
    )
    assert not orphans, f"after {after}: measurements without their round's heartbeat: {[r[0] for r in orphans]}"
    twice = _query(db, "SELECT round_id, target, path, count(*) FROM measurements GROUP BY 1, 2, 3 HAVING count(*) > 1")
    assert not twice, f"after {after}: measurements stored twice: {[tuple(r) for r in twice]}"


def test_kill_9_mid_round_twenty_times_keeps_every_logged_round_whole_and_once(
    tmp_path: Path, lives: Callable[[Path], Lives], listening_port: int, closed_port: int
) -> None:
    """Twenty kills while rounds are in flight ("slow" nearly always is), half of them as the
    daemon begins a write to its store, each followed by a restart; then a clean stop."""
    db = tmp_path / "store.db"
    config = tmp_path / "tunnelwatch.toml"
    config.write_text(f"""
[vantage]
name = "crash"

[store]
path = "{db}"

[probe]
interval_s = 0.2
group_intervals_s = {{ slow = 1 }}
timeout_s = 2

[metrics]
enabled = false

[[targets]]
name = "open"
group = "control"
kind = "tcp"
host = "{LOOPBACK}"
port = {listening_port}

[[targets]]
name = "refused"
group = "control"
kind = "tcp"
host = "{LOOPBACK}"
port = {closed_port}

[[targets]]
name = "slow"
group = "slow"
kind = "tls"
host = "{LOOPBACK}"
port = {listening_port}
timeout_s = 0.8

[[paths]]
name = "lo1"
kind = "bind"
address = "127.0.0.1"
{PATHS}""")
    SQLiteStore(db).close()  # the schema is there to look at from the first life on
    daemon = lives(config)
    chance = random.Random()
    for number in range(20):
        life = daemon.start()
        rounds = 15 if number % 5 == 0 else 1  # some lives long enough for GRACE_MS to tell
        daemon.wait_until(life, lambda life=life, rounds=rounds: stored_since(db, life) >= rounds, "rounds stored")
        time.sleep(chance.uniform(0, 0.3))
        daemon.kill(life, at_write=chance.randint(1, 12) if number % 2 else None)
        check_life(db, life, clean=False)
        check_store(db, life.how)
    last = daemon.start()
    daemon.wait_until(last, lambda: stored_since(db, last) >= 10, "rounds stored after twenty kills")
    daemon.stop(last)
    check_life(db, last, clean=True)
    check_store(db, "a clean stop")
    beats = _query(db, "SELECT target, count(*) FROM heartbeats GROUP BY target")
    assert {row[0] for row in beats} == {"open", "refused", "slow"}, [tuple(r) for r in beats]


# The fleet: a spool with a backlog, forwarded in small batches into a real PostgreSQL.
VANTAGE = "crash-fleet"
BACKLOG = 2000  # measurements waiting as each life starts: 100 batches of 20, more than a life uploads


def top_up(spool: Path, at_least: int = BACKLOG) -> None:
    """Old rounds into the spool, while no daemon runs, until `at_least` measurements wait to
    go up: rounds measured before the daemon had store.url, or while PostgreSQL was away."""
    store = SQLiteStore(spool)
    (row,) = _query(
        spool,
        "SELECT (SELECT count(*) FROM measurements WHERE id > coalesce((SELECT measurement_id "
        "FROM forward_cursor), 0)), (SELECT count(*) FROM heartbeats WHERE target = 'news')",
    )
    waiting, first = row[0], row[1]
    start = datetime.now(UTC) - timedelta(days=1)
    measurements, heartbeats = [], []
    for i in range(first, first + max(0, at_least - waiting + 1) // 2):
        at, round_id = start + timedelta(seconds=20 * i), f"old-{i}"
        measurements += [
            Measurement(
                vantage=VANTAGE,
                round_id=round_id,
                target="news",
                group="blocked",
                path=path,
                kind="http",
                input="https://news.example/",
                started_at=at,
                ok=path == "lo2",
                connect_ms=12.5 + i % 7,
                failure=None if path == "lo2" else "connection_reset",
                failed_operation=None if path == "lo2" else "tls_handshake",
                addresses=("192.0.2.1",),
            )
            for path in ("direct", "lo2")
        ]
        heartbeats.append(
            Heartbeat(
                vantage=VANTAGE,
                round_id=round_id,
                started_at=at,
                finished_at=at,
                probes=2,
                succeeded=1,
                target="news",
                scheduled_at=at,
            )
        )
    store.write(measurements, heartbeats)
    store.close()


def uploaded(url: str) -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute("SELECT count(*) FROM measurements").fetchone()[0])  # type: ignore[index]


def uploading(life: Life, url: str, before: int) -> bool:
    if "measurements stay in the spool" in life.output():
        raise AssertionError(f"an upload failed: {life.output()}")
    return uploaded(url) > before


def cursor_of(spool: Path) -> tuple[int, int, int]:
    """How many measurements the spool's cursor says are uploaded; how many it holds in all;
    how many it gave up over its bound."""
    (row,) = _query(
        spool,
        "SELECT (SELECT count(*) FROM measurements WHERE id <= c.measurement_id), "
        "(SELECT count(*) FROM measurements), c.dropped FROM forward_cursor c",
    )
    return row[0], row[1], row[2]


def table(rows: list[Any]) -> Counter[tuple[Any, ...]]:
    return Counter(tuple(row) for row in rows)


def test_kill_9_of_the_forwarder_mid_upload_and_a_central_outage_leave_postgresql_equal_to_the_spool(
    tmp_path: Path, lives: Callable[[Path], Lives], closed_port: int
) -> None:
    """Five kills of a daemon forwarding a backlog into PostgreSQL, batch by batch: two at
    random moments of the uploads (one of them while PostgreSQL is down, stopped mid-upload),
    three as the daemon begins a page write (mostly noting an uploaded batch in the spool's
    cursor: the batch goes again). After a clean run both stores hold the same rows."""
    spool = tmp_path / "spool.db"
    with cluster() as server:
        url = server.database("crash")
        CentralStore(url).close()  # the schema, to count in from the first life on
        config = tmp_path / "fleet.toml"
        config.write_text(f"""
[vantage]
name = "{VANTAGE}"

[store]
path = "{spool}"
url = "{url}"
forward_every_s = 0.2
forward_batch = 20

[probe]
interval_s = 1
timeout_s = 2

[metrics]
enabled = false

[[targets]]
name = "refused"
group = "control"
kind = "tcp"
host = "{LOOPBACK}"
port = {closed_port}
{PATHS}""")
        daemon = lives(config)
        chance = random.Random()
        resent = 0
        for number, how in enumerate(("random", "write", "outage", "write", "write")):
            top_up(spool)
            before = uploaded(url)
            life = daemon.start()
            daemon.wait_until(life, lambda life=life, before=before: uploading(life, url, before), "uploads")
            if how == "outage":
                server.stop()  # fast: the server cuts the upload in flight
                daemon.wait_until(
                    life, lambda life=life: "measurements stay in the spool" in life.output(), "the failed upload"
                )
                daemon.kill(life)
                server.start()
            elif how == "write":
                daemon.kill(life, at_write=chance.randint(1, 6))
            else:
                time.sleep(chance.uniform(0, 0.2))
                daemon.kill(life)
            noted, held, dropped = cursor_of(spool)
            central = uploaded(url)
            assert central > before, f"kill {number} ({life.how}): nothing went up: {life.output()}"
            assert noted < held, f"kill {number} ({life.how}) came after the backlog was gone: raise BACKLOG"
            assert noted <= central, (
                f"kill {number} ({life.how}): the cursor says {noted} are up, PostgreSQL has {central}"
            )
            assert central <= held and dropped == 0, (life.how, central, held, dropped)
            resent += central > noted  # stored centrally, not yet noted: the batch goes again
            assert _query(spool, "PRAGMA integrity_check")[0][0] == "ok"
        assert resent, "no kill fell between a batch's commit and its cursor: the resend went untested"
        last = daemon.start()
        daemon.wait_until(last, lambda: cursor_of(spool)[0] == cursor_of(spool)[1], "the backlog uploaded", 120)
        daemon.stop(last)
        check_store(spool, "the kills of the forwarder")
        spooled = {
            name: _query(spool, f"SELECT {', '.join(columns)} FROM {name}")
            for name, columns in (("measurements", MEASUREMENT_COLUMNS), ("heartbeats", HEARTBEAT_COLUMNS))
        }
        with psycopg.connect(url) as conn:
            for name, columns in (("measurements", MEASUREMENT_COLUMNS), ("heartbeats", HEARTBEAT_COLUMNS)):
                stored = conn.execute(f"SELECT {', '.join(columns)} FROM {name}").fetchall()
                assert len(stored) == len(spooled[name]) >= BACKLOG // 2, name  # two measurements a round
                missing, extra = table(spooled[name]) - table(stored), table(stored) - table(spooled[name])
                assert not missing and not extra, (name, list(missing)[:3], list(extra)[:3])
            paths = conn.execute(
                "SELECT name, kind, label, endpoint_target FROM paths WHERE vantage = %s", [VANTAGE]
            ).fetchall()
        assert table(paths) == table(_query(spool, "SELECT name, kind, label, endpoint_target FROM paths"))
