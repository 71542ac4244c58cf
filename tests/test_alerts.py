"""Alerts judged round by round (analysis/alerts.py) on stores of known outages: the alerts
are the outages `tunnelwatch outages` lists, said once each, to whom the settings say."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from analysis.alerts import Change, evaluate, window
from analysis.compaction import compact
from analysis.frames import Source
from analysis.pipeline import analyse
from probe.config import Config, load_config
from probe.store.alerts import Alert, open_alerts, recent_alerts
from probe.store.schema import to_ms
from tests.analysis_data import INTERVAL, T0, WEEK, analysis_config, build_store, everything, fail, realistic_week
from tests.test_analysis_cli import TUNNELWATCH

HOOK = "json://127.0.0.1:9/hook"
PROXY_DOWN = fail("connection_refused", "proxy_connect")
WEEK_END = WEEK + timedelta(days=7)


def replay(
    cfg: Config, start: datetime, end: datetime, every: timedelta, compacted: bool = False
) -> list[tuple[datetime, Change]]:
    """The daemon's evaluations from start to end, each a fresh connection as a child process
    has; `compacted`: with the daemon's compaction before each."""
    seen = []
    now = start
    while now <= end:
        if compacted:
            compact(cfg.store.path, cfg.probe.interval_s, cfg.store.keep_raw_days, now)
        seen += [(now, change) for change in evaluate(cfg, now)]
        now += every
    return seen


def alerts_of(db: Path) -> list[Alert]:
    with sqlite3.connect(db) as conn:
        return recent_alerts(conn, 0)


def messages(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT title, body FROM notifications ORDER BY id").fetchall()


def config(tmp: Path, db: Path, alerts: str = "") -> Config:
    return load_config(analysis_config(tmp, db, f'[alerts]\nurls = ["{HOOK}"]\n{alerts}'))


@pytest.fixture(scope="module")
def week(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Config, Path, list[tuple[datetime, Change]]]]:
    """realistic_week replayed with an evaluation every four hours (a slow daemon's group_s),
    compacted as the daemon does: the analysis reads summaries and the raw rows of the last hours."""
    tmp = tmp_path_factory.mktemp("week")
    db = tmp / "tw.db"
    realistic_week(db)
    cfg = config(tmp, db)
    yield (
        cfg,
        db,
        replay(cfg, WEEK + timedelta(minutes=1), WEEK_END + timedelta(hours=4), timedelta(hours=4), compacted=True),
    )


def test_the_alerts_are_the_outages_the_outages_command_lists(week: tuple[Config, Path, list]) -> None:  # type: ignore[type-arg]
    cfg, db, _ = week
    later = analyse(Source(db), None, None).pairs  # `tunnelwatch outages --by target` over the whole week
    alerts = {(a.path, a.target, a.start_ms): a for a in alerts_of(db) if a.target != "*"}
    gap = (WEEK + timedelta(days=5, hours=3), WEEK + timedelta(days=5, hours=9))  # the daemon was stopped
    matched = set()
    for _, o in later.iterrows():
        key = (o["path"], o["target"], to_ms(o["start"]))
        if key not in alerts:  # the part after the gap of an outage that went on across it: one alert
            (spanning,) = [
                a
                for a in alerts.values()
                if a.path == o["path"]
                and a.target == o["target"]
                and a.start_ms < to_ms(gap[0])
                and (a.end_ms is None or a.end_ms > to_ms(gap[1]))
            ]
            continue
        alert = alerts[key]
        matched.add(key)
        if o["end"] - o["start"] <= window(cfg):  # a longer one has the verdict of its latest hours
            assert alert.verdict == o["verdict"], (key, alert.verdict, o["verdict"])
        assert set(alert.rules) == set(o["rules"]), key
        if not o["ongoing"] and not gap[0] <= o["end"] <= gap[1] + INTERVAL:
            assert alert.end_ms == to_ms(o["end"]), (key, alert.end_ms, to_ms(o["end"]))
    assert set(alerts) == matched  # no alert that is not an outage
    crackdown = [a for a in alerts.values() if a.path == "vpn" and a.verdict == "tunnel_down"]
    assert {a.target for a in crackdown} == {"news", "search", "portal", "shop"}
    assert all(a.detail == "endpoint generic_timeout_error" for a in crackdown), [a.detail for a in crackdown]


def test_each_outage_is_announced_down_once_and_back_once(week: tuple[Config, Path, list]) -> None:  # type: ignore[type-arg]
    _, db, changes = week
    downs = [(c.alert.path, c.alert.target, c.alert.start_ms) for _, c in changes if c.kind == "down"]
    backs = [(c.alert.path, c.alert.target, c.alert.start_ms) for _, c in changes if c.kind == "back"]
    assert len(downs) == len(set(downs)) and len(backs) == len(set(backs))
    assert set(downs) <= set(backs) | {(a.path, a.target, a.start_ms) for a in alerts_of(db) if a.open}
    # the blocked sites stay blocked directly all week, across the daemon's six-hour stop: said once
    assert [d for d in downs if d[:2] == ("direct", "news")] == [("direct", "news", to_ms(WEEK))]
    assert {(a.path, a.target) for a in alerts_of(db) if a.open} == {("direct", "news"), ("direct", "search")}


def test_a_round_of_changes_is_one_message_readable_on_a_phone(week: tuple[Config, Path, list]) -> None:  # type: ignore[type-arg]
    _, db, _ = week
    sent = messages(db)
    crackdown = [body for title, body in sent if "vpn DOWN" in body]
    assert len(crackdown) == 1
    (line,) = [x for x in crackdown[0].splitlines() if x.startswith("vpn DOWN")]
    # 10:00 in Beijing on Tuesday: the crackdown the week holds
    assert line.startswith("vpn DOWN since 2018-03-06 10:00 CST: tunnel_down (the tunnel failed every control target")
    assert "endpoint generic_timeout_error" in line and "4 targets: news, portal, search, shop" in line
    back = next(body for _, body in sent if "vpn back after" in body)
    assert "vpn back after 16" in back and "tunnel_down" in back
    slow = next(body for _, body in sent if "direct DOWN" in body and "degraded" in body)
    assert "x the 7-day median" in slow


def test_who_hears_what_kinds_and_groups(tmp_path: Path) -> None:
    db = tmp_path / "tw.db"
    realistic_week(db)
    control = '[[targets]]\nname = "portal"\ngroup = "control"\nkind = "http"\nurl = "https://portal.example/"\n'
    cfg = config(tmp_path, db, f'kinds = ["tunnel_down"]\ngroups = ["control"]\n{control}')
    changes = replay(cfg, WEEK + timedelta(days=1, hours=12), WEEK + timedelta(days=2, hours=4), timedelta(hours=2))
    told = {(c.alert.path, c.alert.target) for _, c in changes}
    assert told == {("vpn", "portal"), ("vpn", "shop")}  # the control targets' crackdown, nothing blocked
    recorded = {(a.path, a.target, a.announced) for a in alerts_of(db)}
    assert ("vpn", "news", "") in recorded  # still an alert: `alerts list` shows it, nobody is told
    assert all("news" not in body for _, body in messages(db))


def test_an_outage_shorter_than_min_duration_is_never_announced(tmp_path: Path) -> None:
    db = tmp_path / "tw.db"
    down = {("news", "vpn"): PROXY_DOWN}  # the tunnel's own step: tunnel_down
    build_store(db, [(i, everything(down if 10 <= i < 13 or 30 <= i < 50 else {})) for i in range(60)])
    cfg = config(tmp_path, db, "min_duration_s = 1800\n")
    changes = replay(cfg, T0 + timedelta(seconds=30), T0 + 60 * INTERVAL, 2 * INTERVAL)
    assert [(c.kind, c.alert.start_ms // 1000) for _, c in changes] == [
        ("down", to_ms(T0 + 30 * INTERVAL) // 1000),  # announced once 30 minutes old
        ("back", to_ms(T0 + 30 * INTERVAL) // 1000),
    ]
    (when_down,) = [t for t, c in changes if c.kind == "down"]
    assert when_down >= T0 + 36 * INTERVAL
    assert len(alerts_of(db)) == 2  # the 15-minute one is kept, not told


def test_a_gap_in_the_rounds_never_opens_an_alert(tmp_path: Path) -> None:
    db = tmp_path / "tw.db"
    down = {("news", "vpn"): PROXY_DOWN}
    # one failing round before the daemon stopped, one after: never two in a row
    rounds = [(i, everything(down if i in (19, 40) else {})) for i in range(60) if not 20 <= i < 40]
    build_store(db, rounds)
    cfg = config(tmp_path, db)
    assert replay(cfg, T0 + timedelta(seconds=30), T0 + 60 * INTERVAL, 2 * INTERVAL) == []
    assert alerts_of(db) == []


def test_a_restart_neither_repeats_nor_forgets_an_open_alert(tmp_path: Path) -> None:
    db = tmp_path / "tw.db"
    down = {("news", "vpn"): PROXY_DOWN}
    rounds = [(i, everything(down if 10 <= i < 50 else {})) for i in range(60) if not 20 <= i < 30]
    build_store(db, rounds)
    cfg = config(tmp_path, db)
    before = replay(cfg, T0 + timedelta(seconds=30), T0 + 20 * INTERVAL, 2 * INTERVAL)  # then the daemon stops
    after = replay(cfg, T0 + 30 * INTERVAL, T0 + 60 * INTERVAL, 2 * INTERVAL)  # and starts again, still failing
    assert [c.kind for _, c in before] == ["down"]
    assert [c.kind for _, c in after] == ["back"]
    (alert,) = alerts_of(db)
    assert alert.start_ms // 1000 == to_ms(T0 + 10 * INTERVAL) // 1000
    assert alert.end_ms is not None and alert.end_ms // 1000 == to_ms(T0 + 50 * INTERVAL) // 1000


def test_evaluating_again_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "tw.db"
    build_store(db, [(i, everything({("news", "vpn"): PROXY_DOWN} if i >= 5 else {})) for i in range(12)])
    cfg = config(tmp_path, db)
    now = T0 + 12 * INTERVAL
    assert [c.kind for c in evaluate(cfg, now)] == ["down"]
    assert evaluate(cfg, now) == [] and evaluate(cfg, now + timedelta(seconds=1)) == []
    assert len(messages(db)) == 1


def test_the_first_evaluation_tells_what_is_open_not_history(tmp_path: Path) -> None:
    db = tmp_path / "tw.db"
    old, now_down = {("news", "vpn"): PROXY_DOWN}, {("shop", "wg"): fail("connection_refused", "bind")}
    build_store(db, [(i, everything(old if 10 <= i < 20 else now_down if i >= 100 else {})) for i in range(110)])
    changes = evaluate(config(tmp_path, db), T0 + 110 * INTERVAL)
    assert [(c.kind, c.alert.path, c.alert.target) for c in changes] == [("down", "wg", "shop")]


def test_alerts_list_and_evaluate_from_the_command_line(tmp_path: Path) -> None:
    db = tmp_path / "tw.db"
    build_store(db, [(i, everything({("news", "vpn"): PROXY_DOWN} if i >= 5 else {})) for i in range(12)])
    path = analysis_config(tmp_path, db)
    now = (T0 + 12 * INTERVAL).strftime("%Y-%m-%dT%H:%M:%S")
    done = subprocess.run(
        [*TUNNELWATCH, "alerts", "evaluate", "--config", str(path), "--now", now],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "1 change" in done.stderr
    listed = subprocess.run(
        [*TUNNELWATCH, "alerts", "list", "--config", str(path), "--days", "100000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert "vpn" in listed.stdout and "tunnel_down" in listed.stdout and "open" in listed.stdout
    with sqlite3.connect(db) as conn:
        (alert,) = open_alerts(conn)
    assert json.loads(json.dumps(alert.rules)) == ["tunnel-own-step"]
    assert alert.failure == "connection_refused at proxy_connect"
    status = subprocess.run(
        [*TUNNELWATCH, "status", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert status.returncode == 0, status.stderr
    assert "open alerts (1)" in status.stdout and "tunnel-own-step" in status.stdout


def test_the_daemon_evaluates_once_per_interval_not_once_per_target_round(tmp_path: Path) -> None:
    """Each target is a round of its own: 40 rounds stored within a second make one evaluation
    at once (the first) and the next only an interval after it."""
    import asyncio

    from probe.daemon.evaluations import Evaluations

    class Jobs:
        runs = 0

        async def evaluate_alerts(self) -> None:
            Jobs.runs += 1

    db = tmp_path / "tw.db"
    build_store(db, [(0, everything())])
    cfg = config(tmp_path, db).model_copy(
        update={"probe": config(tmp_path, db).probe.model_copy(update={"interval_s": 60})}
    )
    woken = []

    async def main() -> None:
        evaluations = Evaluations(cfg, Jobs(), lambda: woken.append(1))  # type: ignore[arg-type]
        task = asyncio.create_task(evaluations.run())
        for _ in range(40):
            evaluations.round_stored()
            await asyncio.sleep(0.025)
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert Jobs.runs == 1 and woken == [1]
