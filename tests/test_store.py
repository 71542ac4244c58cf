"""The SQLite store: schema migrations, whole batches, and integrity after kill -9."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from probe.errors import StoreError
from probe.model import Heartbeat, Measurement
from probe.store.schema import (
    HEARTBEAT_COLUMNS,
    MEASUREMENT_COLUMNS,
    PATH_COLUMNS,
    ROLLUP_CURSOR_COLUMNS,
    SUMMARY_TABLES,
)
from probe.store.sqlite import MIGRATIONS, StoreDamaged, StoreLock, StoreLost, open_store


def measurement(round_id: str = "r1", target: str = "google", ok: bool = False) -> Measurement:
    return Measurement(
        vantage="v",
        round_id=round_id,
        target=target,
        group="blocked",
        path="direct",
        kind="http",
        input="https://www.google.com/",
        started_at=datetime(2018, 3, 5, 8, 0, tzinfo=UTC),
        ok=ok,
        failure=None if ok else "connection_reset",
        failed_operation=None if ok else "tls_handshake",
        resolve_ms=12.5,
        connect_ms=80.25,
        addresses=("142.250.1.1", "2a00::1"),
        cert_not_after=datetime(2030, 1, 1, tzinfo=UTC),
        tls_verified=True,
        detail="ConnectionResetError",
    )


def heartbeat(round_id: str = "r1") -> Heartbeat:
    now = datetime(2018, 3, 5, 8, 0, tzinfo=UTC)
    return Heartbeat(vantage="v", round_id=round_id, started_at=now, finished_at=now, probes=1, succeeded=0)


def test_new_store_is_migrated_to_the_latest_schema(tmp_path: Path) -> None:
    store = open_store(tmp_path / "sub" / "tw.db")
    assert store.schema_version == len(MIGRATIONS)
    mode = sqlite3.connect(tmp_path / "sub" / "tw.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    store.close()


def test_the_schema_lists_are_the_columns_of_the_tables(tmp_path: Path) -> None:
    open_store(tmp_path / "tw.db").close()
    db = sqlite3.connect(tmp_path / "tw.db")

    def columns(table: str) -> tuple[str, ...]:
        return tuple(row[1] for row in db.execute(f"PRAGMA table_info({table})"))

    assert columns("measurements") == ("id", *MEASUREMENT_COLUMNS)
    assert columns("heartbeats") == HEARTBEAT_COLUMNS
    assert columns("paths") == PATH_COLUMNS
    assert columns("rollup_cursor") == ("id", *ROLLUP_CURSOR_COLUMNS)
    for table in SUMMARY_TABLES:
        assert columns(table.name) == table.columns
    db.close()


def test_measurements_round_trip(tmp_path: Path) -> None:
    store = open_store(tmp_path / "tw.db")
    store.write([measurement()], [heartbeat()])
    store.close()
    store = open_store(tmp_path / "tw.db")  # reopening migrates nothing and keeps the rows
    (row,) = store.measurements("r1")
    assert row["failure"] == "connection_reset" and row["failed_operation"] == "tls_handshake"
    assert row["addresses"] == ["142.250.1.1", "2a00::1"]
    assert row["started_at"] == datetime(2018, 3, 5, 8, 0, tzinfo=UTC)
    assert (row["resolve_ms"], row["connect_ms"], row["grp"]) == (12.5, 80.25, "blocked")
    assert [h["round_id"] for h in store.heartbeats()] == ["r1"]
    store.close()


def test_a_failed_batch_writes_nothing(tmp_path: Path) -> None:
    store = open_store(tmp_path / "tw.db")
    store.write([measurement("r1")], [heartbeat("r1")])
    with pytest.raises(StoreError, match="cannot write 1 measurements"):
        store.write([measurement("r2")], [heartbeat("r1")])  # duplicate heartbeat: the batch fails
    assert [m["round_id"] for m in store.measurements()] == ["r1"]
    store.close()


def test_a_store_from_a_newer_tunnelwatch_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "tw.db")
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this tunnelwatch knows"):
        open_store(tmp_path / "tw.db")


def test_an_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot open the store"):
        open_store(tmp_path / "file" / "tw.db")


WRITER = """
import sys
from pathlib import Path
from probe.store.sqlite import open_store
from tests.test_store import measurement
store = open_store(Path(sys.argv[1]))
batch = [measurement(f"r{i}") for i in range(200)]
print("ready", flush=True)
while True:
    store.write(batch)
"""


def test_kill_9_during_writes_loses_at_most_the_batch_in_flight(tmp_path: Path) -> None:
    db = tmp_path / "tw.db"
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent
    ) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    store = open_store(db)
    assert store.integrity_check() == "ok"
    count = len(store.measurements())
    assert count > 0 and count % 200 == 0  # whole batches only
    store.close()


def test_a_version_1_store_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "tw.db")
    db.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    db.execute(
        "INSERT INTO heartbeats (round_id, vantage, started_at_ms, finished_at_ms, probes, succeeded) "
        "VALUES ('old', 'v', 1, 2, 3, 1)"
    )
    db.commit()
    db.close()
    store = open_store(tmp_path / "tw.db")
    assert store.schema_version == len(MIGRATIONS) >= 2
    (old,) = store.heartbeats()
    assert (old["round_id"], old["probes"], old["target"], old["scheduled_at_ms"]) == ("old", 3, None, None)
    store.write([measurement("new")], [heartbeat("new")])
    assert [h["round_id"] for h in store.heartbeats()] == ["old", "new"]
    store.close()


def test_a_store_with_a_damaged_header_is_refused_naming_the_file(tmp_path: Path) -> None:
    db = tmp_path / "tw.db"
    open_store(db).close()
    with db.open("r+b") as f:
        f.write(b"not a SQLite file at all")
    with pytest.raises(StoreDamaged, match=re.escape(f"{db}: the store is damaged (file is not a database)")):
        open_store(db)


def test_damage_the_quick_look_at_open_misses_is_found_by_a_read_and_by_the_full_check(tmp_path: Path) -> None:
    db = tmp_path / "tw.db"
    store = open_store(db)
    store.write([measurement(f"r{i}") for i in range(20_000)])
    store.close()
    with db.open("r+b") as f:
        f.seek(db.stat().st_size // 2)
        f.write(bytes(8192))  # two pages of measurements zeroed
    store = open_store(db)  # the header, the schema and the newest pages are sound
    with pytest.raises(StoreDamaged, match=re.escape(f"{db}: the store is damaged (database disk image is malformed)")):
        store.measurements()
    with pytest.raises(StoreDamaged, match="the store is damaged"):
        store.verify()
    store.close()


def test_a_deleted_store_is_noticed_before_a_write_and_reopened_with_its_lock(tmp_path: Path) -> None:
    db = tmp_path / "tw.db"
    lock = StoreLock(db)
    lock.acquire()
    store = open_store(db, lock)
    store.record_paths([("direct", "direct", "", None)])
    store.verify()
    store.write([measurement("r1")], [heartbeat("r1")])
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    with pytest.raises(StoreLost, match=re.escape(f"{db}: the store file was deleted")) as lost:
        store.write([measurement("r2")], [heartbeat("r2")])
    assert lost.value.reason == "deleted" and not db.exists()  # nothing written into nothing
    assert store.reopen() == "started a fresh store"
    store.verify()
    store.write([measurement("r2")], [heartbeat("r2")])
    assert [m["round_id"] for m in store.measurements()] == ["r2"]
    assert sqlite3.connect(db).execute("SELECT name FROM paths").fetchall() == [("direct",)]
    with pytest.raises(StoreError, match=f"pid {os.getpid()}"):  # the lock followed the store
        StoreLock(db).acquire()
    store.close()
    lock.release()


def test_a_replaced_store_is_noticed_and_the_new_file_written(tmp_path: Path) -> None:
    db = tmp_path / "tw.db"
    store = open_store(db)
    store.write([measurement("old")], [heartbeat("old")])
    other = open_store(tmp_path / "restored.db")
    other.write([measurement("restored")], [heartbeat("restored")])
    other.close()
    (tmp_path / "restored.db").rename(db)
    with pytest.raises(StoreLost, match="replaced by another") as lost:
        store.write([measurement("new")], [heartbeat("new")])
    assert lost.value.reason == "replaced"
    assert store.reopen() == "opened the file now there"
    store.verify()
    store.write([measurement("new")], [heartbeat("new")])
    assert [m["round_id"] for m in store.measurements()] == ["restored", "new"]
    store.close()


def test_a_write_the_stopping_daemon_cancels_is_finished_and_not_written_again(tmp_path: Path) -> None:
    """SIGTERM cancels the writer while its thread is inside a write: the write still ends
    and counts what it stored, so the final flush neither writes the round again (a UNIQUE
    error, once 'could not write ... before exiting') nor loses it."""
    import asyncio
    import threading

    from probe.daemon.metrics import Metrics
    from probe.daemon.writer import StoreWriter

    store = open_store(tmp_path / "tw.db")
    inside, release = threading.Event(), threading.Event()
    real_write = store.write

    def slow_write(measurements: list[Measurement], heartbeats: list[Heartbeat]) -> None:
        inside.set()
        release.wait(10)  # the daemon stops while this thread writes
        real_write(measurements, heartbeats)

    store.write = slow_write  # type: ignore[method-assign]

    async def scenario() -> bool:
        writer = StoreWriter(store, Metrics(), max_buffer=1000, retry_s=0.1)
        writer.submit([measurement("r1")], heartbeat("r1"))
        running = asyncio.ensure_future(writer.run())
        await asyncio.to_thread(inside.wait, 10)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        release.set()
        writer.submit([measurement("r2")], heartbeat("r2"))  # a round that finished during the drain
        done = await writer.flush()
        assert writer.buffered == 0
        return done

    assert asyncio.run(scenario())
    assert sorted(r["round_id"] for r in rows_of(tmp_path / "tw.db", "heartbeats")) == ["r1", "r2"]
    assert len(rows_of(tmp_path / "tw.db", "measurements")) == 2


def rows_of(db: Path, table: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(f"SELECT * FROM {table}").fetchall()
    finally:
        conn.close()
