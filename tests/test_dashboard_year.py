"""Pages over long ranges say what the commands say, from summaries kept in memory.

A compacted store from bench/synth.py (summaries for all but its last 14 days, raw rows
after: both halves are read), served in-process; the Outages, History and Events pages over
a range longer than the data are compared with `tunnelwatch outages` and `tunnelwatch events
check` run on the same store, before and after more days are written and compacted (the
server's kept summaries follow the store's cursor: ranges.Held). The analysis with and
without those kept summaries is compared frame by frame. Speed is bench/dashboard_pages.py's.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from analysis import ranges
from analysis.frames import load_paths, read_cursor
from analysis.pipeline import Analysis, analyse, analyse_config
from analysis.ranges import Held, load_summary
from analysis.web import pages
from analysis.web.app import build_app, read_summaries
from analysis.web.cache import Pages
from bench.synth import PATHS, build
from probe.config import load_config
from probe.store.sqlite import open_store

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette.testclient over httpx: deprecated, still working
    from starlette.testclient import TestClient

TUNNELWATCH = [sys.executable, "-m", "probe"]
START = datetime(2018, 1, 20, tzinfo=UTC)  # 44 days before the NPC's opening: events check's baseline fits
FIRST_DAYS, MORE_DAYS, TARGETS = 45, 6, 4
KEEP_RAW_DAYS = 14


@dataclass
class Year:
    db: Path
    config: Path


@pytest.fixture(scope="module")
def year(tmp_path_factory: pytest.TempPathFactory) -> Year:
    tmp = tmp_path_factory.mktemp("year")
    db = tmp / "year.db"
    build(db, FIRST_DAYS, TARGETS, START, keep_raw_days=KEEP_RAW_DAYS)
    config = tmp / "tunnelwatch.toml"
    config.write_text(
        f'[vantage]\nname = "bench"\n[store]\npath = "{db}"\n[report]\ndirectory = "{tmp / "reports"}"\n'
        '[[targets]]\nname = "t000"\ngroup = "blocked"\nkind = "http"\nurl = "https://t000.example/"\n'
        '[[paths]]\nname = "direct"\nkind = "direct"\n'
    )
    return Year(db, config)


def write_more(year: Year) -> None:
    """MORE_DAYS after the first ones, written and compacted as the daemon does."""
    build(year.db, MORE_DAYS, TARGETS, START + pd.Timedelta(days=FIRST_DAYS), keep_raw_days=KEEP_RAW_DAYS)


def cli(year: Year, *args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [*TUNNELWATCH, *args, "--config", str(year.config), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def page(client: TestClient, url: str) -> dict[str, Any]:
    answer = client.get(url, headers={"Accept": "application/json"})
    assert answer.status_code == 200, answer.text
    facts: dict[str, Any] = answer.json()
    return facts


def check_pages_against_the_commands(client: TestClient, year: Year, since: str, until: str) -> None:
    span = f"since={since}&until={until}"
    printed = cli(year, "outages", "--since", since, "--until", until)
    assert any(r["path"] == "vpn" and r["verdict"] == "tunnel_down" for r in printed)  # the NPC crackdown
    assert any(r["path"] == "direct" and r["verdict"] == "blocked" for r in printed)
    assert page(client, f"/outages?{span}")["rows"] == printed
    history = page(client, f"/history?{span}")
    assert history["outages"] == printed
    checks = cli(year, "events", "check")
    assert checks and "npc" in {row["category"] for row in checks}
    shown = page(client, "/events")["rows"]
    assert [{k: row.get(k) for k in checks[0]} for row in shown] == checks


def test_long_range_pages_say_what_the_commands_say(year: Year) -> None:
    with TestClient(build_app(load_config(year.config), warm=False)) as client:
        check_pages_against_the_commands(client, year, "2017-06-01", "2018-06-01")
        html = client.get("/history?since=2017-06-01&until=2018-06-01").text
        assert "Availability per day" in html and "daily median" in html  # a year drawn by day
        assert "Availability per hour" in client.get("/history?since=2018-02-20&until=2018-02-27").text
        cursor = read_cursor(year.db)
    write_more(year)
    assert read_cursor(year.db) != cursor
    # a new app (its kept pages are new) over the summaries this process keeps: they follow
    # the store's cursor (a kept page may lag a live store by cache.FRESH_S, by design)
    with TestClient(build_app(load_config(year.config), warm=False)) as client:
        check_pages_against_the_commands(client, year, "2017-06-02", "2018-06-02")


def same(a: Analysis, b: Analysis) -> None:
    for name in ("runs", "hourly", "latency", "coverage"):
        pd.testing.assert_frame_equal(getattr(a.summary, name), getattr(b.summary, name), obj=name)
    pd.testing.assert_frame_equal(a.pairs, b.pairs, obj="pairs")
    pd.testing.assert_frame_equal(a.paths, b.paths, obj="paths")


RANGES = [
    (None, None),
    (datetime(2017, 6, 1, tzinfo=UTC), datetime(2018, 6, 1, tzinfo=UTC)),
    (datetime(2018, 2, 3, 5, 7, tzinfo=UTC), datetime(2018, 2, 10, tzinfo=UTC)),  # inside the summaries
    (datetime(2018, 2, 25, tzinfo=UTC), datetime(2018, 3, 7, 13, tzinfo=UTC)),  # across the cursor
    (datetime(2018, 3, 4, tzinfo=UTC), None),
]


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Path]:
    db = tmp_path / "fresh.db"
    build(db, 30, 3, START + pd.Timedelta(days=15), seed=3, keep_raw_days=7)
    yield db


def test_kept_summaries_give_the_analysis_of_the_store(fresh: Path) -> None:
    held = Held(fresh)
    for since, until in RANGES:
        same(analyse(fresh, since, until), analyse(fresh, since, until, held=held))
    first = held.cursor
    build(fresh, 3, 3, START + pd.Timedelta(days=45), seed=4, keep_raw_days=7)  # compaction moves the cursor
    for since, until in RANGES:
        same(analyse(fresh, since, until), analyse(fresh, since, until, held=held))
    assert first is not None and held.cursor is not None and held.cursor > first


def count_summaries(monkeypatch: pytest.MonkeyPatch) -> list[tuple[pd.Timestamp | None, pd.Timestamp | None]]:
    """The ranges of raw rows summarised from now on (ranges.summarise_raw's calls, any thread's)."""
    summarised: list[tuple[pd.Timestamp | None, pd.Timestamp | None]] = []
    real = ranges.summarise_raw

    def counted(db: Path, start: pd.Timestamp | None, end: pd.Timestamp | None, slot_s: float) -> Any:
        summarised.append((start, end))
        return real(db, start, end, slot_s)

    monkeypatch.setattr(ranges, "summarise_raw", counted)
    return summarised


def test_the_raw_rows_after_the_cursor_are_summarised_once_per_state(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held.tail: ranges that run past the newest raw row share one summary of the rows after
    the cursor; rounds written after are in the next analysis; a range that ends among the
    raw rows is summarised from the store. Every analysis is the one without kept summaries."""
    end = START + pd.Timedelta(days=45)  # the fixture's rounds end there, all compacted
    build(fresh, 1, 3, end, seed=5)  # a day of rounds after them, not compacted: raw after the cursor
    past = [(None, None), RANGES[1], (datetime(2018, 2, 27, 6, tzinfo=UTC), datetime(2018, 4, 1, tzinfo=UTC))]
    among = (datetime(2018, 2, 25, tzinfo=UTC), datetime(2018, 3, 6, 18, tzinfo=UTC))
    held = Held(fresh)

    def check(since: datetime | None, until: datetime | None) -> Analysis:
        expected = analyse(fresh, since, until)  # as the commands read the store
        summarised.clear()
        got = analyse(fresh, since, until, held=held)
        same(expected, got)
        return got

    summarised = count_summaries(monkeypatch)
    before = check(*past[0]).summary.coverage["end"].max()
    cursor = held.cursor
    assert cursor is not None and cursor < before - pd.Timedelta(hours=23)  # a day of raw rows
    assert summarised == [(cursor, None)]  # the tail, summarised once for this state
    for since, until in past[1:]:
        check(since, until)
        assert summarised == []
    # the stored summaries and the tail joined once (Held.whole), every range above cut from it
    # (analyse reads from a week before the range: its baseline); a summary that starts within
    # a run's step before the cursor is joined for itself, one a day before is cut from it
    assert held._whole is not None and held._whole[0] is held._tail
    whole = held._whole
    for start, cut in ((cursor - pd.Timedelta(minutes=5), False), (cursor - pd.Timedelta(days=1), True)):
        assert (held.whole(cursor, start, None, 300) is not None) is cut
        for name in ("runs", "hourly", "latency", "coverage"):
            pd.testing.assert_frame_equal(
                getattr(load_summary(fresh, start, None, 300), name),
                getattr(load_summary(fresh, start, None, 300, held), name),
                obj=name,
            )
    del summarised[:]  # the first load_summary of each: the store's own
    assert held._whole is whole
    check(*among)
    assert summarised == [(cursor, pd.Timestamp(among[1]))]  # its end cuts the last rounds: from the store
    check(*past[1])
    assert summarised == []
    build(fresh, 1, 3, end + pd.Timedelta(days=1), seed=6)  # another day of rounds, not compacted
    assert read_cursor(fresh) == cursor
    for since, until in past:
        after = check(since, until)
        assert after.summary.coverage["end"].max() >= before + pd.Timedelta(hours=23)
        assert summarised == ([(cursor, None)] if (since, until) == past[0] else [])


def test_a_server_may_lag_the_raw_rows_and_catches_up_in_the_background(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held(lag_s): after new rounds, a summary of the raw rows younger than lag_s is used as
    it is (the analysis of the store before them) and made again in the background; the
    next analysis is the store's as it is. Past lag_s, the page summarises them itself."""
    end = START + pd.Timedelta(days=45)
    build(fresh, 1, 3, end, seed=5)
    held = Held(fresh, lag_s=600)
    before = analyse(fresh, *RANGES[1])  # as the commands read the store
    summarised = count_summaries(monkeypatch)
    same(before, analyse(fresh, *RANGES[1], held=held))
    cursor = held.cursor
    assert summarised == [(cursor, None)]
    build(fresh, 1, 3, end + pd.Timedelta(days=1), seed=6)  # a day of rounds more, not compacted
    summarised.clear()
    with held.making():  # a page being made: the catch-up waits for it (up to ranges.YIELD_S)
        same(before, analyse(fresh, *RANGES[1], held=held))  # the kept summary, as it was
        time.sleep(ranges.SETTLE_S + 1)
        assert summarised == []
    deadline = time.monotonic() + 120
    while summarised != [(cursor, None)]:  # made again in the background, after ranges.SETTLE_S
        assert time.monotonic() < deadline, f"not caught up: {summarised}"
        time.sleep(0.1)
    deadline = time.monotonic() + 60
    while (thread := held._catching_up) is not None and thread.is_alive():
        assert time.monotonic() < deadline, "the catch-up did not end"
        time.sleep(0.1)
    assert held._whole is not None and held._whole[0] is held._tail  # joined to the stored summaries too
    now = analyse(fresh, *RANGES[1])
    del summarised[1:]
    assert now.summary.coverage["end"].max() > before.summary.coverage["end"].max() + pd.Timedelta(hours=23)
    same(now, analyse(fresh, *RANGES[1], held=held))  # the store as it is
    assert summarised == [(cursor, None)]
    # a path's kind changed (the daemon records its paths as it starts): the summary made
    # with the old ones is not used, however young
    store = open_store(fresh)
    store.record_paths([(name, "socks5" if name == "proxy" else kind, label, to) for name, kind, label, to in PATHS])
    store.close()
    assert "socks5" in set(load_paths(fresh).set_index("name").loc[["proxy"], "kind"])
    expected = analyse(fresh, *RANGES[1])
    summarised.clear()
    same(expected, analyse(fresh, *RANGES[1], held=held))
    assert summarised == [(cursor, None)]
    held.lag_s = 0  # past the lag, the analysis summarises the new rounds itself
    build(fresh, 1, 3, end + pd.Timedelta(days=2), seed=7)
    expected = analyse(fresh, *RANGES[1])
    summarised.clear()
    same(expected, analyse(fresh, *RANGES[1], held=held))
    assert summarised == [(cursor, None)]
    held.lag_s = 600  # compaction moves the cursor: the summary of the rows after the old one is not used
    build(fresh, 1, 3, end + pd.Timedelta(days=3), seed=8, keep_raw_days=7)
    assert read_cursor(fresh) != cursor
    same(analyse(fresh, *RANGES[1]), analyse(fresh, *RANGES[1], held=held))


def test_a_catch_up_of_a_store_gone_says_so_without_a_traceback(fresh: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The store removed (a copy served, then deleted) while its summary is caught up in the
    background: a warning naming it, no traceback in the log."""
    held = Held(fresh, lag_s=600)
    analyse(fresh, *RANGES[1], held=held)
    build(fresh, 1, 3, START + pd.Timedelta(days=45), seed=5)  # rounds after the kept summary
    with caplog.at_level(logging.WARNING, logger="tunnelwatch.serve"):
        with held.making():  # the catch-up waits for the page being made (up to ranges.YIELD_S)
            analyse(fresh, *RANGES[1], held=held)  # the kept summary, and a catch-up started
            for path in fresh.parent.glob(f"{fresh.name}*"):
                path.unlink()
        thread = held._catching_up
        assert thread is not None
        thread.join(60)
        assert not thread.is_alive()
    [record] = [r for r in caplog.records if "summarising the raw rows" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert str(fresh) in record.getMessage() and "no store there" in record.getMessage()


def config_for(db: Path) -> Path:
    """A config that serves `db` (one target and path: the store's own are analysed)."""
    config = db.parent / "tunnelwatch.toml"
    config.write_text(
        f'[vantage]\nname = "bench"\n[store]\npath = "{db}"\n'
        '[[targets]]\nname = "t000"\ngroup = "blocked"\nkind = "http"\nurl = "https://t000.example/"\n'
        '[[paths]]\nname = "direct"\nkind = "direct"\n'
    )
    return config


def test_a_page_made_while_the_summary_lagged_is_made_again_once_caught_up(fresh: Path) -> None:
    """cache.Pages: a page made from a lagging summary of the raw rows is behind the store;
    once the summary is caught up it is made again, though no round came in since (the state
    of a kept page holds the summary's version)."""
    end = START + pd.Timedelta(days=45)
    build(fresh, 1, 3, end, seed=5)
    cfg = load_config(config_for(fresh))
    kept = Pages(cfg, stale_s=0, fresh_s=0)  # a changed store: made again at once
    held = pages.held(cfg)

    def make() -> pd.Timestamp:
        return analyse_config(cfg, None, None, held=held).summary.coverage["end"].max()

    try:
        first = kept.get(("p",), make)
        build(fresh, 1, 3, end + pd.Timedelta(days=1), seed=6)  # a day of rounds more, then quiet
        assert kept.get(("p",), make) == first  # made from the summary made a moment ago
        deadline = time.monotonic() + 120
        while held._catching_up is None or held._catching_up.is_alive():
            assert time.monotonic() < deadline, "not caught up"
            time.sleep(0.1)
        assert kept.get(("p",), make) > first + pd.Timedelta(hours=23)
    finally:
        kept.close()


def test_the_server_summarises_the_raw_rows_as_it_starts(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_summaries (serve's start) summarises the raw rows after the cursor too: a page over
    a year then summarises nothing, and says what `tunnelwatch outages` says."""
    build(fresh, 1, 3, START + pd.Timedelta(days=45), seed=5)  # a day of rounds after the compacted ones
    config = config_for(fresh)
    printed = cli(Year(fresh, config), "outages", "--since", "2017-06-01", "--until", "2018-06-01")
    summarised = count_summaries(monkeypatch)
    cfg = load_config(config)
    read_summaries(cfg)
    assert summarised == [(read_cursor(fresh), None)]
    with TestClient(build_app(cfg, warm=False)) as client:
        assert page(client, "/outages?since=2017-06-01&until=2018-06-01")["rows"] == printed
    assert len(summarised) == 1
