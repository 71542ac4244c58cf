"""Fleet mode against a real PostgreSQL: the central store, the forwarder, two daemons."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import psycopg
import pytest

from analysis.compaction import compact
from analysis.fleet import fleet_outages
from probe.config import PathSpec, parse_config, redact
from probe.errors import ConfigError, StoreError
from probe.fleet.forwarder import Forwarder
from probe.fleet.uplink import Uplink
from probe.model import Heartbeat, Measurement
from probe.store.central import MIGRATIONS, CentralStore, month_bounds
from probe.store.schema import (
    HEARTBEAT_COLUMNS,
    MEASUREMENT_COLUMNS,
    PATH_COLUMNS,
    ROLLUP_CURSOR_COLUMNS,
    SUMMARY_TABLES,
)
from probe.store.spool import Spool
from probe.store.sqlite import SQLiteStore
from tests.analysis_data import analysis_config, realistic_week
from tests.conftest import Proxies
from tests.daemonproc import TUNNELWATCH, Daemon, fast
from tests.postgres import Postgres, cluster
from tests.servers import LOOPBACK

START = datetime(2018, 3, 31, 23, 0, tzinfo=UTC)  # the MIIT deadline: rows on both sides of a month's end


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with cluster() as server:
        yield server


def spool_with(path: Path, rounds: int, vantage: str = "v1", start: datetime = START) -> SQLiteStore:
    """A spool holding `rounds` rounds of two paths, every 5 minutes from `start`."""
    store = SQLiteStore(path)
    store.record_paths([("direct", "direct", "", None), ("socks", "socks5", "", None)])
    for i in range(rounds):
        at, round_id = start + timedelta(minutes=5 * i), f"r{i}"
        store.write(
            [
                Measurement(
                    vantage=vantage,
                    round_id=round_id,
                    target="news",
                    group="blocked",
                    path=p,
                    kind="http",
                    input="https://news.example/",
                    started_at=at,
                    ok=p == "socks",
                    connect_ms=12.5,
                    failure=None if p == "socks" else "connection_reset",
                    failed_operation=None if p == "socks" else "tls_handshake",
                )
                for p in ("direct", "socks")
            ],
            [Heartbeat(vantage=vantage, round_id=round_id, started_at=at, finished_at=at, probes=2, succeeded=1)],
        )
    return store


def test_the_central_store_migrates_once_and_partitions_by_month(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.database("migrate")
    CentralStore(url).close()
    central = CentralStore(url)  # a second open migrates nothing
    spool_with(tmp_path / "spool.db", rounds=30).close()
    with sqlite3.connect(tmp_path / "spool.db") as db:
        measurements = db.execute(f"SELECT {', '.join(MEASUREMENT_COLUMNS)} FROM measurements").fetchall()
        heartbeats = db.execute(f"SELECT {', '.join(HEARTBEAT_COLUMNS)} FROM heartbeats").fetchall()
    assert central.ingest("v1", measurements, heartbeats) == 60
    assert central.ingest("v1", measurements, heartbeats) == 0  # sent twice, stored once
    assert central.count() == 60 and central.count("heartbeats") == 30
    with psycopg.connect(url) as conn:
        (version,) = conn.execute("SELECT version FROM schema_version").fetchone()  # type: ignore[misc]
        months = {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'measurements'"
            )
        }
        per_month = dict(conn.execute("SELECT tableoid::regclass::text, count(*) FROM measurements GROUP BY 1"))
    assert version == len(MIGRATIONS)
    assert months == {"measurements_y2018m03", "measurements_y2018m04"}
    assert per_month == {"measurements_y2018m03": 24, "measurements_y2018m04": 36}  # 12 rounds before midnight
    central.close()


def test_the_central_tables_have_the_schema_columns_and_the_vantage(postgres: Postgres) -> None:
    url = postgres.database("columns")
    CentralStore(url).close()
    with psycopg.connect(url) as conn:

        def columns(table: str) -> tuple[str, ...]:
            return tuple(
                row[0]
                for row in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
                    [table],
                )
            )

        assert columns("measurements") == MEASUREMENT_COLUMNS
        assert columns("heartbeats") == HEARTBEAT_COLUMNS
        assert columns("paths") == ("vantage", *PATH_COLUMNS)
        assert columns("rollup_cursor") == ("vantage", *ROLLUP_CURSOR_COLUMNS)
        for table in SUMMARY_TABLES:
            assert columns(table.name) == ("vantage", *table.columns)


def test_a_central_store_from_a_newer_tunnelwatch_is_refused(postgres: Postgres) -> None:
    url = postgres.database("newer")
    CentralStore(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", [len(MIGRATIONS) + 1])
    newer = rf"schema version {len(MIGRATIONS) + 1} is newer than this tunnelwatch knows \({len(MIGRATIONS)}\); upgrade"
    with pytest.raises(StoreError, match=newer):
        CentralStore(url)


def test_month_bounds() -> None:
    start, end, suffix = month_bounds(round(datetime(2018, 12, 31, 23, tzinfo=UTC).timestamp() * 1000))
    assert suffix == "y2018m12"
    assert (datetime.fromtimestamp(start / 1000, UTC), datetime.fromtimestamp(end / 1000, UTC)) == (
        datetime(2018, 12, 1, tzinfo=UTC),
        datetime(2019, 1, 1, tzinfo=UTC),
    )


def test_the_forwarder_uploads_every_row_exactly_once(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.database("exactly_once")
    store = spool_with(tmp_path / "spool.db", rounds=20)
    forwarder = Forwarder(tmp_path / "spool.db", url, "v1", batch=7, max_backlog=10_000)
    assert forwarder.backlog().measurements == 40
    assert forwarder.forward() == 40
    assert forwarder.backlog().measurements == 0 and forwarder.backlog().age_s() == 0
    store.write(*_one_more_round(START + timedelta(hours=5)))
    assert forwarder.backlog().measurements == 2
    assert forwarder.forward() == 2
    # a forwarder that died after the upload, before noting it: everything goes again
    with sqlite3.connect(tmp_path / "spool.db") as db:
        db.execute("UPDATE forward_cursor SET measurement_id = 0, heartbeat_rowid = 0")
    forwarder.forward()
    with CentralStore(url) as central:
        assert (central.count(vantage="v1"), central.count("heartbeats")) == (42, 21)
    with psycopg.connect(url) as conn:
        paths = conn.execute("SELECT vantage, name, kind FROM paths ORDER BY name").fetchall()
    assert paths == [("v1", "direct", "direct"), ("v1", "socks", "socks5")]
    forwarder.close()
    store.close()


def _one_more_round(at: datetime) -> tuple[list[Measurement], list[Heartbeat]]:
    return (
        [
            Measurement(
                vantage="v1",
                round_id="late",
                target="news",
                group="blocked",
                path=p,
                kind="http",
                input="https://news.example/",
                started_at=at,
                ok=True,
            )
            for p in ("direct", "socks")
        ],
        [Heartbeat(vantage="v1", round_id="late", started_at=at, finished_at=at, probes=2, succeeded=2)],
    )


def test_an_unreachable_central_store_loses_nothing(tmp_path: Path) -> None:
    with cluster() as server:
        url = server.database("outage")
        store = spool_with(tmp_path / "spool.db", rounds=10)
        forwarder = Forwarder(tmp_path / "spool.db", url, "v1", batch=1000, max_backlog=10_000)
        server.stop()
        with pytest.raises(StoreError, match="cannot open the central store"):
            forwarder.forward()
        forwarder.disconnect()
        assert forwarder.backlog().measurements == 20
        store.write(*_one_more_round(START + timedelta(hours=2)))
        server.start()
        assert forwarder.forward() == 22
        with CentralStore(url) as central:
            assert central.count() == 22
        forwarder.close()
        store.close()


def test_the_backlog_is_bounded_and_what_it_gave_up_is_counted(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.database("bounded")
    spool_with(tmp_path / "spool.db", rounds=30).close()
    forwarder = Forwarder(tmp_path / "spool.db", url, "v1", batch=1000, max_backlog=50)
    assert forwarder.forward() == 50
    assert forwarder.backlog().dropped == 10
    with psycopg.connect(url) as conn:
        kept = {r[0] for r in conn.execute("SELECT DISTINCT round_id FROM measurements")}
    assert kept == {f"r{i}" for i in range(5, 30)}  # the 5 oldest rounds were given up, not the newest
    forwarder.close()


def test_compaction_keeps_what_is_not_uploaded_yet(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.database("compaction")
    spool_with(tmp_path / "spool.db", rounds=40, start=datetime(2018, 3, 1, tzinfo=UTC)).close()
    forwarder = Forwarder(tmp_path / "spool.db", url, "v1", batch=30, max_backlog=10_000)
    forwarder._forward_batch()  # noqa: SLF001 - one batch only: 30 of 80 uploaded
    now = datetime(2018, 4, 1, tzinfo=UTC)
    compact(tmp_path / "spool.db", 300, keep_raw_days=1, now=now, keep_unforwarded=True)
    assert forwarder.backlog().measurements == 50  # nothing unsent was deleted
    with sqlite3.connect(tmp_path / "spool.db") as db:
        (left,) = db.execute("SELECT count(*) FROM measurements").fetchone()
    assert left == 50  # the 30 uploaded rows, summarised and older than a day, went
    assert forwarder.forward() == 50
    with CentralStore(url) as central:
        assert central.count() == 80
    forwarder.close()


def test_a_bad_central_url_is_a_config_error_without_the_password(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[vantage]\nname = "v"\n[store]\nurl = "mysql://u:hunter2@db/tw"\n'
        '[[targets]]\nname = "t"\ngroup = "control"\nkind = "tcp"\nhost = "127.0.0.1"\nport = 1\n'
        '[[paths]]\nname = "direct"\nkind = "direct"\n'
    )
    result = subprocess.run([*TUNNELWATCH, "run", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "store.url" in result.stderr and "postgresql://" in result.stderr and "hunter2" not in result.stderr
    assert redact("postgresql://tw:hunter2@db:5432/tw") == "postgresql://tw:***@db:5432/tw"


def _vantage(config_file: Path, name: str, url: str) -> Path:
    text = config_file.read_text()
    config = config_file.with_name(f"{name}.toml")
    config.write_text(
        text.replace('name = "test-vantage"', f'name = "{name}"')
        .replace(str(config_file.parent / "store.db"), str(config_file.parent / f"{name}.db"))
        .replace("[store]\n", f'[store]\nurl = "{url}"\nforward_every_s = 0.5\n')
        .replace("[metrics]\n", "[metrics]\nenabled = false\n")
    )
    return config


def _spooled(db: Path) -> set[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return set(conn.execute("SELECT round_id, target, path FROM measurements"))


def test_two_vantage_points_through_a_central_outage(config_file: Path, daemons: Callable[..., Daemon]) -> None:
    """Two daemons report into PostgreSQL; it is stopped mid-run and started again; every
    measurement of each arrives exactly once."""
    fast(config_file)
    with cluster() as server:
        url = server.database("fleet")
        a, b = (daemons(_vantage(config_file, name, url)) for name in ("vantage-a", "vantage-b"))
        for daemon in (a, b):
            daemon.wait_until(lambda d=daemon: len(d.heartbeats()) >= 6, what="rounds before the outage")
        server.stop()
        outage_from = len(a.heartbeats())
        a.wait_until(lambda: len(a.heartbeats()) >= outage_from + 6, what="rounds during the outage")
        assert backlog_of(a.db) > 0
        server.start()
        time.sleep(2)
        for daemon in (a, b):
            assert daemon.stop() == 0, daemon.output()
        with psycopg.connect(url) as conn:
            stored: dict[str, list[tuple[str, ...]]] = {"vantage-a": [], "vantage-b": []}
            for vantage, *key in conn.execute("SELECT vantage, round_id, target, path FROM measurements"):
                stored[vantage].append(tuple(key))
        for name, daemon in (("vantage-a", a), ("vantage-b", b)):
            spooled = _spooled(daemon.db)
            assert len(stored[name]) == len(spooled) and set(stored[name]) == spooled  # once each, none lost
            command = ["outages", "--by", "target", "--format", "csv", "--config", str(daemon.config)]
            local = cli(*command, "--store", str(daemon.db))
            central = cli(*command, "--store", url, "--vantage", name)
            assert local.returncode == 0 and central.returncode == 0, local.stderr + central.stderr
            assert central.stdout == local.stdout and "down" in local.stdout
        fleet = cli("outages", "--fleet", "--format", "json", "--config", str(a.config), "--store", url)
        assert fleet.returncode == 0, fleet.stderr
        agreed = [json.loads(line) for line in fleet.stdout.splitlines()]  # both see the closed port alike
        assert agreed and {(r["target"], r["agree"], tuple(r["vantages"])) for r in agreed} == {
            ("down", "2/2", ("vantage-a", "vantage-b"))
        }
        assert "measurements stay in the spool" in a.output() and "reachable again" in a.output()


def test_status_shows_the_backlog(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.database("status")
    spool_with(tmp_path / "spool.db", rounds=20, start=datetime.now(UTC) - timedelta(hours=3)).close()
    forwarder = Forwarder(tmp_path / "spool.db", url, "v1", batch=10, max_backlog=10_000)
    forwarder._forward_batch()  # noqa: SLF001 - one batch of 10 only
    forwarder.close()
    config = tmp_path / "fleet.toml"
    config.write_text(
        f'[vantage]\nname = "v1"\n[store]\npath = "{tmp_path / "spool.db"}"\n'
        f'url = "{url.replace("tunnelwatch@", "tunnelwatch:s3cret@")}"\n'
        '[[targets]]\nname = "news"\ngroup = "blocked"\nkind = "tcp"\nhost = "127.0.0.1"\nport = 1\n'
        '[[paths]]\nname = "direct"\nkind = "direct"\n'
    )
    result = subprocess.run([*TUNNELWATCH, "status", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("central store")]
    assert "30 measurements not uploaded yet, the oldest from" in line and "(2.6 h ago)" in line  # round r5
    assert "s3cret" not in result.stdout and "tunnelwatch:***@" in result.stdout


def test_the_fleet_verdict_needs_the_quorum() -> None:
    t = pd.Timestamp("2018-03-05 00:00", tz="UTC")
    hour = pd.Timedelta(hours=1)
    outages = pd.DataFrame([
        {"vantage": "beijing", "target": "news", "verdict": "blocked", "start": t, "end": t + 5 * hour},
        {"vantage": "shanghai", "target": "news", "verdict": "blocked", "start": t + 2 * hour, "end": t + 8 * hour},
        {"vantage": "guangzhou", "target": "news", "verdict": "blocked", "start": t + 4 * hour, "end": t + 6 * hour},
        {"vantage": "guangzhou", "target": "news", "verdict": "tunnel_down", "start": t, "end": t + 9 * hour},
        {"vantage": "beijing", "target": "search", "verdict": "blocked", "start": t, "end": t + hour},
        {"vantage": "shanghai", "target": "search", "verdict": "blocked", "start": t + hour, "end": t + 2 * hour},
    ])  # fmt: skip
    two = fleet_outages(outages, members=3, quorum=2)
    (row,) = two.to_dict(
        "records"
    )  # touching outages (search) are not at once; one vantage's tunnel_down is not the fleet's
    assert (row["target"], row["verdict"], row["start"], row["end"]) == ("news", "blocked", t + 2 * hour, t + 6 * hour)
    assert row["agree"] == "3/3" and row["vantages"] == ("beijing", "guangzhou", "shanghai") and row["minutes"] == 240
    (all_three,) = fleet_outages(outages, members=3, quorum=3).to_dict("records")
    assert (all_three["start"], all_three["end"]) == (t + 4 * hour, t + 5 * hour)
    assert fleet_outages(outages.iloc[:0], members=3, quorum=2).empty


@pytest.fixture(scope="module")
def fleet(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Two vantage points' weeks (the same story, different noise) in their spools and,
    forwarded, in PostgreSQL; and a config to analyse them. Beijing's spool was compacted:
    its summaries go up with its raw rows. Shanghai's was not: analysis reads raw rows."""
    tmp = tmp_path_factory.mktemp("fleet")
    url = postgres.database("analysis")
    for name, seed in (("beijing", 7), ("shanghai", 8)):
        realistic_week(tmp / f"{name}.db", seed=seed)
        with sqlite3.connect(tmp / f"{name}.db") as db:
            for table in ("measurements", "heartbeats"):
                db.execute(f"UPDATE {table} SET vantage = ?", [name])
        forwarder = Forwarder(tmp / f"{name}.db", url, name, batch=10_000, max_backlog=10_000_000)
        if name == "beijing":
            forwarder._forward_batch()  # noqa: SLF001 - some rows go up before compaction, the rest after
            compact(
                tmp / f"{name}.db", 300, keep_raw_days=1, now=datetime(2018, 3, 20, tzinfo=UTC), keep_unforwarded=True
            )
        forwarder.forward()
        forwarder.close()
    return analysis_config(tmp, tmp / "beijing.db"), tmp, url


@pytest.mark.parametrize("vantage", ["beijing", "shanghai"])
def test_analysis_answers_alike_from_postgresql_and_from_the_spool(fleet: tuple[Path, Path, str], vantage: str) -> None:
    config, tmp, url = fleet
    for command in (
        ["outages", "--format", "csv"],
        ["outages", "--by", "target", "--format", "csv"],
        [
            "events",
            "check",
            "--category",
            "npc",
            "--format",
            "csv",
            "--baseline",
            "2d",
            "--gap",
            "0",
            "--onset-before",
            "0",
            "--onset-after",
            "0",
            "--placebo-gap",
            "0",
        ],
    ):  # 8 days: a short baseline
        local = cli(*command, "--config", str(config), "--store", str(tmp / f"{vantage}.db"))
        central = cli(*command, "--config", str(config), "--store", url, "--vantage", vantage)
        assert local.returncode == 0 and central.returncode == 0, local.stderr + central.stderr
        assert central.stdout == local.stdout and len(local.stdout.splitlines()) >= 2  # a header and rows
    with sqlite3.connect(tmp / "beijing.db") as db, psycopg.connect(url) as conn:
        assert db.execute("SELECT count(*) FROM measurements").fetchone()[0] < 20_000  # compacted: summaries answer
        (runs,) = conn.execute("SELECT count(*) FROM verdict_runs WHERE vantage = 'beijing'").fetchone()  # type: ignore[misc]
        assert runs == db.execute("SELECT count(*) FROM verdict_runs").fetchone()[0] > 0
    unchosen = cli("outages", "--config", str(config), "--store", url)
    assert unchosen.returncode == 2
    assert "2 vantage points (beijing, shanghai)" in unchosen.stderr and "--vantage" in unchosen.stderr


def test_the_fleet_agrees_on_the_crackdown(fleet: tuple[Path, Path, str]) -> None:
    config, _, url = fleet
    result = cli("outages", "--fleet", "--config", str(config), "--store", url, "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    crackdown = [r for r in rows if r["verdict"] == "tunnel_down"]
    assert crackdown and {r["agree"] for r in crackdown} == {"2/2"}
    assert all(r["vantages"] == ["beijing", "shanghai"] for r in rows)
    assert any(r["start"].startswith("2018-03-06T0") for r in crackdown)  # Tuesday 10:00 Beijing is 02:00 UTC
    alone = cli("outages", "--fleet", "--quorum", "3", "--config", str(config), "--store", url, "--format", "json")
    assert alone.returncode == 0 and alone.stdout == ""  # 3 of 2 can never agree


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUNNELWATCH, *args], capture_output=True, text=True, timeout=300)


def test_uploads_leave_through_the_uplink_path(
    postgres: Postgres, tmp_path: Path, proxies: Proxies, closed_port: int
) -> None:
    """A bind path (WireGuard's address) shows as the client's address at the server; a
    SOCKS path carries the upload; a path that fails loses nothing."""
    url = postgres.database("uplink")
    spool_with(tmp_path / "spool.db", rounds=20).close()

    async def forward_through(path: PathSpec) -> tuple[int | str, str | None]:
        uplink = Uplink(url, path)
        forwarder = Forwarder(
            tmp_path / "spool.db", url, "v1", batch=10, max_backlog=10_000, conninfo=await uplink.start()
        )
        try:
            sent: int | str = await asyncio.to_thread(forwarder.forward)
            with psycopg.connect(url) as conn:
                row = conn.execute(
                    "SELECT host(client_addr) FROM pg_stat_activity WHERE datname = 'uplink' "
                    "AND pid <> pg_backend_pid()"
                ).fetchone()
            return sent, row[0] if row else None
        except StoreError as exc:
            return str(exc), None
        finally:
            await asyncio.to_thread(forwarder.close)
            await uplink.close()

    failed, _ = asyncio.run(forward_through(PathSpec(name="down", kind="socks5", host=LOOPBACK, port=closed_port)))
    assert isinstance(failed, str) and "cannot open the central store" in failed
    assert backlog_of(tmp_path / "spool.db") == 40
    sent, client = asyncio.run(forward_through(PathSpec(name="wg", kind="bind", address="127.0.0.2")))
    assert (sent, client) == (40, "127.0.0.2")
    store = SQLiteStore(tmp_path / "spool.db")
    store.write(*_one_more_round(START + timedelta(hours=5)))
    store.close()
    sent, _ = asyncio.run(forward_through(PathSpec(name="socks", kind="socks5", host=LOOPBACK, port=proxies.socks)))
    assert sent == 2 and backlog_of(tmp_path / "spool.db") == 0
    with CentralStore(url) as central:
        assert central.count() == 42


def backlog_of(spool: Path) -> int:
    with sqlite3.connect(spool) as db:
        return Spool(db).backlog().measurements


@pytest.mark.parametrize(("store", "message"), [
    ('url = "postgresql://tw@db/tw"\nuplink = "nope"', "store.uplink: 'nope' is not a path; use one of direct"),
    ('uplink = "direct"', "store.uplink: set store.url too"),
])  # fmt: skip
def test_an_uplink_is_a_path_of_the_config(store: str, message: str) -> None:
    text = (
        f'[vantage]\nname = "v"\n[store]\n{store}\n[[targets]]\nname = "t"\ngroup = "control"\nkind = "tcp"\n'
        'host = "127.0.0.1"\nport = 1\n[[paths]]\nname = "direct"\nkind = "direct"\n'
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(text, "fleet.toml")


def test_an_unknown_vantage_point_is_named(fleet: tuple[Path, Path, str]) -> None:
    config, tmp, url = fleet
    for store in (url, str(tmp / "beijing.db")):
        result = cli("outages", "--config", str(config), "--store", store, "--vantage", "hangzhou")
        assert result.returncode == 2 and "no vantage point 'hangzhou' there" in result.stderr, result.stderr


def test_old_months_retire_where_summaries_cover_them(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.database("retire")
    spool_with(tmp_path / "spool.db", rounds=30).close()  # 2018-03-31 23:00 to 2018-04-01 01:25
    compact(tmp_path / "spool.db", 300, keep_raw_days=1, now=datetime(2018, 4, 2, 6, tzinfo=UTC), keep_unforwarded=True)
    spool_with(tmp_path / "other.db", rounds=30, vantage="v2").close()  # never compacted: no summaries
    config = tmp_path / "fleet.toml"
    config.write_text(
        f'[vantage]\nname = "v1"\n[store]\npath = "{tmp_path / "spool.db"}"\nurl = "{url}"\n'
        '[[targets]]\nname = "news"\ngroup = "blocked"\nkind = "http"\nurl = "https://news.example/"\n'
        '[[paths]]\nname = "direct"\nkind = "direct"\n[[paths]]\nname = "socks"\nkind = "socks5"\n'
        'host = "127.0.0.1"\nport = 1080\n'
    )
    for name, spool in (("v1", "spool.db"), ("v2", "other.db")):
        forwarder = Forwarder(tmp_path / spool, url, name, batch=1000, max_backlog=10_000)
        forwarder.forward()
        forwarder.close()
    before = cli("outages", "--config", str(config), "--store", url, "--vantage", "v1", "--format", "csv")
    blocked = cli("store", "retire", "--keep-months", "0", "--config", str(config))
    assert blocked.returncode == 0 and "dropped 0 monthly partitions" in blocked.stderr, blocked.stderr
    with psycopg.connect(url) as conn:
        conn.execute("DELETE FROM paths WHERE vantage = 'v2'")  # v2 retired from the fleet
    retired = cli("store", "retire", "--keep-months", "0", "--config", str(config))
    assert retired.returncode == 0, retired.stderr
    assert "dropped 2 monthly partitions (heartbeats_y2018m03, measurements_y2018m03)" in retired.stderr
    after = cli("outages", "--config", str(config), "--store", url, "--vantage", "v1", "--format", "csv")
    assert after.stdout == before.stdout and "blocked" in before.stdout  # March answers from summaries
    with CentralStore(url) as central:
        assert central.count(vantage="v1") == 2 * 18  # April's 18 rounds stay raw
