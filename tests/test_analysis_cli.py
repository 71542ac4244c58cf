"""`tunnelwatch outages` and `tunnelwatch events` as a user runs them, on a store of known data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.analysis_data import analysis_config, build_store, everything, fail
from tests.servers import shared_data

TUNNELWATCH = [sys.executable, "-m", "probe"]
START = datetime(2019, 7, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
CRACKDOWN = range(9 * 24 + 2, 9 * 24 + 10)  # 2019-07-10 02:00-10:00 UTC: the tunnel is down
USER_EVENTS = """
[[events]]
id = "test-crackdown"
title = "A crackdown on tunnels"
category = "blocking-wave"
start = 2019-07-10
end = 2019-07-10
confidence = "confirmed"
source = "the test"

[[events]]
id = "quiet-day"
title = "Nothing happened"
category = "policy"
start = 2019-07-16
end = 2019-07-16
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("analysis")
    down = {(t, "vpn"): fail("connection_refused", "proxy_connect") for t in ("news", "search", "portal", "shop")}
    rounds = [(i, everything(down if i in CRACKDOWN else {})) for i in range(40 * 24)]
    build_store(tmp / "tw.db", rounds, start=START, interval=HOUR)
    (tmp / "events.toml").write_text(USER_EVENTS)
    extra = f'[probe]\ninterval_s = 3600\n[analysis]\nevents = ["{tmp / "events.toml"}"]'
    return analysis_config(tmp, tmp / "tw.db", extra)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUNNELWATCH, *args], capture_output=True, text=True, timeout=120)


def test_outages_lists_the_crackdown_with_its_event(store: Path) -> None:
    result = cli("outages", "--config", str(store), "--format", "json")
    assert result.returncode == 0, result.stderr
    (outage,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert (outage["path"], outage["verdict"]) == ("vpn", "tunnel_down")
    assert outage["targets"] == ["news", "portal", "search", "shop"]
    assert outage["start"].startswith("2019-07-10T02:00") and outage["end"].startswith("2019-07-10T10:00")
    assert outage["events"] == ["test-crackdown"]


def test_outages_filters_and_formats(store: Path) -> None:
    assert cli("outages", "--config", str(store), "--path", "direct", "--format", "json").stdout == ""
    csv = cli("outages", "--config", str(store), "--by", "target", "--kind", "tunnel_down", "--format", "csv")
    lines = csv.stdout.splitlines()
    assert lines[0].startswith("path,targets,start,end") and len(lines) == 5
    table = cli("outages", "--config", str(store), "--since", "2019-07-12")
    assert table.returncode == 0 and "no outages in that range" in table.stderr


# 40 days of data: a short baseline and placebo dates near the events (the defaults need months).
SHORT = ["--baseline", "7d", "--gap", "1d", "--onset-before", "0", "--onset-after", "0", "--placebo-gap", "2d"]


def test_events_check_finds_the_crackdown_and_no_effect_on_a_quiet_day(store: Path) -> None:
    checks = {}
    for event in ("test-crackdown", "quiet-day"):
        result = cli("events", "check", "--config", str(store), "--event", event, *SHORT, "--format", "json")
        assert result.returncode == 0, result.stderr
        checks.update({c["event"]: c for c in map(json.loads, result.stdout.splitlines())})
    crackdown, quiet = checks["test-crackdown"], checks["quiet-day"]
    assert crackdown["verdict"].startswith("effect: ") and "none in the baseline" in crackdown["verdict"]
    assert crackdown["p_value"] < 0.05 and crackdown["placebos"] >= 19
    assert crackdown["lead_lag_hours"] == 10  # the event starts at midnight Beijing, 16:00 UTC the day before
    assert crackdown["inside_rate"] == pytest.approx(8 / 24, rel=1e-2)
    assert quiet["verdict"].startswith("no effect: ")
    assert quiet["inside_rate"] == 0
    together = cli("events", "check", "--config", str(store), "--event", "test-crackdown", "--format", "json")
    (default,) = map(json.loads, together.stdout.splitlines())  # 40 days are too few for a 28-day baseline
    assert default["verdict"].startswith("not evaluable: ") and default["p_value"] is None


def test_events_check_on_an_external_series(tmp_path: Path, store: Path) -> None:
    days = [START + timedelta(days=d) for d in range(60)]
    rows = ["date,users"] + [
        f"{d:%Y-%m-%d},{400 if d.day == 10 and d.month == 7 else 1000 + (d.day % 3)}" for d in days
    ]
    (tmp_path / "tor.csv").write_text("\n".join(rows) + "\n")
    checks = {}
    for event in ("test-crackdown", "quiet-day"):
        result = cli(
            "events",
            "check",
            "--config",
            str(store),
            "--series",
            str(tmp_path / "tor.csv"),
            "--column",
            "users",
            "--event",
            event,
            *SHORT,
            "--format",
            "json",
        )
        assert result.returncode == 0, result.stderr
        checks.update({c["event"]: c for c in map(json.loads, result.stdout.splitlines())})
    assert "(drop)" in checks["test-crackdown"]["verdict"] and checks["test-crackdown"]["ratio"] < 0.5
    assert checks["quiet-day"]["verdict"].startswith("no effect")


def test_events_list_imports_icalendar(tmp_path: Path, store: Path) -> None:
    (tmp_path / "cal.ics").write_text(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\nUID:plenum-2024@example\r\n"
        "SUMMARY:Third Plenum\r\nDTSTART;VALUE=DATE:20240715\r\nDTEND;VALUE=DATE:20240719\r\n"
        "CATEGORIES:party-congress\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    result = cli(
        "events",
        "list",
        "--config",
        str(store),
        "--events",
        str(tmp_path / "cal.ics"),
        "--year",
        "2024",
        "--category",
        "party-congress",
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    (event,) = map(json.loads, result.stdout.splitlines())
    assert (event["id"], event["start"], event["end"]) == ("plenum-2024@example", "2024-07-15", "2024-07-18")


def test_events_list_shows_titles_as_written(tmp_path: Path, store: Path) -> None:
    """A title is the calendar author's text, not console markup: brackets print as they are."""
    (tmp_path / "mine.toml").write_text(
        '[[events]]\nid = "x"\ntitle = "[/] closes and [bold]bolds"\n'
        'category = "npc"\nstart = 2019-07-02\nend = 2019-07-03\n'
    )
    result = cli("events", "list", "--config", str(store), "--events", str(tmp_path / "mine.toml"), "--year", "2019")
    assert result.returncode == 0, result.stderr
    assert "[/] closes and [bold]bolds" in result.stdout


def test_shipped_calendar_has_the_known_dates(store: Path) -> None:
    result = cli("events", "list", "--config", str(store), "--format", "json", "--year", "2018")
    events = {e["id"]: e for e in map(json.loads, result.stdout.splitlines())}
    assert (events["npc-2018"]["start"], events["npc-2018"]["end"]) == ("2018-03-05", "2018-03-20")
    assert events["miit-deadline-2018"]["start"] == "2018-03-31"
    march_2016 = cli(
        "events", "list", "--config", str(store), "--format", "json", "--year", "2016", "--category", "npc"
    ).stdout
    assert '"npc-2016"' in march_2016 and '"2016-03-05"' in march_2016


ICS = (
    "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\nUID:x@example\r\n"
    "SUMMARY:Plenum\r\n{}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
)
MIB = 1 << 20


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "bad.toml").write_text(
        '[[events]]\nid = "x"\ntitle = "t"\ncategory = "gossip"\nstart = 2019-01-01\nend = 2019-01-02\n'
    )
    (tmp / "tables.toml").write_text("events = [1, 2]\n")
    (tmp / "bad.ics").write_text("this is not a calendar")
    (tmp / "notadate.ics").write_text(ICS.format("DTSTART:notadate"))
    (tmp / "duration.ics").write_text(ICS.format("DTSTART;VALUE=DATE:20240715\r\nDURATION:P1X"))
    (tmp / "nostart.ics").write_text(ICS.format("CATEGORIES:npc"))
    (tmp / "bad.csv").write_text("date,visitors\n2019-07-01,5\n")
    (tmp / "worse.csv").write_text("date,users\n2019-07-01,5\n2019-07-02,many\n")
    (tmp / "names.csv").write_text("name,city\nalice,paris\nbob,lyon\n")
    (tmp / "dates.csv").write_text("date,users\n2019-07-01,5\n2019-07-02 13:00,6\n\nyesterday,7\n")
    (tmp / "inf.csv").write_text("date,users\n2019-07-01,5\n2019-07-02,inf\n")
    (tmp / "short.csv").write_text("date,users\n" + "".join(f"2019-07-{d:02d},{d}\n" for d in range(1, 21)))
    # bounds, not timings: each of these took the reader seconds to minutes and gigabytes as it grew
    (tmp / "wide.csv").write_text("date,users," + ",".join(f"c{i}" for i in range(19_998)) + "\n2019-07-01,5\n")
    (tmp / "long.csv").write_text("date,users," + "x" * (2 * MIB) + "\n2019-07-01,5,6\n")
    (tmp / "endless.csv").write_text("date,users\n2019-07-01,5\n2019-07-02," + "9" * (2 * MIB) + "\n")
    (tmp / "quote.csv").write_text('date,users\n2019-07-01,5\n2019-07-02,"6\n2019-07-03,7\n')
    return tmp


BAD = [
    (["events", "check", "--event", "nope"], "no event with id 'nope'"),
    (["outages", "--since", "last tuesday"], "'last tuesday' is not a date"),
    (["outages", "--since", "2019-07-10", "--until", "2019-07-01"], "is not before --until"),
    (["events", "check", "--before", "3 weeks"], "is not a duration"),
    (["events", "list", "--events", "{tmp}/bad.toml"], "bad.toml: events[0] (line 1) (id 'x'): category"),
    (["events", "list", "--events", "{tmp}/tables.toml"], "tables.toml: events[0]: expected a table of id, title"),
    (["events", "list", "--events", "{tmp}/bad.ics"], "bad.ics: not a valid iCalendar file"),
    (["events", "list", "--events", "{tmp}/notadate.ics"],
     "notadate.ics: line 7: VEVENT 1 ('Plenum'): DTSTART 'notadate': Wrong date format notadate; valid: a date"),
    (["events", "list", "--events", "{tmp}/duration.ics"],
     "duration.ics: line 8: VEVENT 1 ('Plenum'): DURATION 'P1X': Invalid iCalendar duration: P1X; valid: a duration"),
    (["events", "check", "--events", "{tmp}/nostart.ics"], "nostart.ics: line 4: VEVENT 1 ('Plenum'): has no DTSTART"),
    (["events", "check", "--series", "{tmp}/bad.csv", "--column", "users"], "bad.csv: no column 'users'"),
    (["events", "check", "--series", "{tmp}/worse.csv", "--column", "users"],
     "worse.csv: line 3: users 'many' is not a finite number; valid: a number"),
    (["events", "check", "--series", "{tmp}/names.csv", "--column", "city"],
     "names.csv: no date column among 'name', 'city'; name one of date, day"),
    (["events", "check", "--series", "{tmp}/dates.csv", "--column", "users"],
     "dates.csv: line 5: date 'yesterday' is not a date; valid: an ISO 8601 date or time"),
    (["events", "check", "--series", "{tmp}/inf.csv", "--column", "users"], "inf.csv: line 3: users 'inf' is not a finite"),
    (["events", "check", "--series", "{tmp}/short.csv", "--column", "users"],
     "short.csv: the data spans 20 days; the baseline alone needs 35 before a window"),
    (["events", "check", "--series", "{tmp}/short.csv", "--column", "users", "--missing", "x"],
     "'x' is not a valid float"),
    (["events", "check", "--missing", "0"], "--missing is for --series"),
    (["events", "check", "--series", "{tmp}/wide.csv", "--column", "users"],
     "wide.csv: line 1: 20,000 columns; a series may have at most 10,000"),
    (["events", "check", "--series", "{tmp}/long.csv", "--column", "users"],
     "long.csv: line 1: the header is longer than 1,048,576 bytes"),
    (["events", "check", "--series", "{tmp}/endless.csv", "--column", "users"],
     "endless.csv: line 3: longer than 1,048,576 bytes"),
    (["events", "check", "--series", "{tmp}/quote.csv", "--column", "users"],
     'quote.csv: line 3: a quote (") opens a field that no quote closes; valid: a field in quotes ends with a quote'),
    (["chart", "weekly", "--week", "2018-W99"], "--week '2018-W99': 2018 has weeks W01 to W52; write YYYY-Www, e.g. 2018-W10"),
    (["report", "weekly", "--week", "2021-W53"], "--week '2021-W53': 2021 has weeks W01 to W52; write YYYY-Www"),
    (["chart", "weekly", "--week", "2018-10"], "--week '2018-10' is not an ISO week; write YYYY-Www, e.g. 2018-W10"),
    (["chart", "weekly", "--week", "1000-W10"], "--week '1000-W10': the year must be 1678 to 2261; write YYYY-Www"),
    (["outages", "--since", "1000-01-01"], "'1000-01-01': the year must be 1678 to 2261"),
    (["events", "check", "--until", "9999-12-31"], "'9999-12-31': the year must be 1678 to 2261"),
]  # fmt: skip


def test_the_years_the_analysis_takes_are_those_pandas_holds() -> None:
    import pandas as pd

    from analysis.options import FIRST_YEAR, LAST_YEAR

    assert (FIRST_YEAR, LAST_YEAR) == (pd.Timestamp.min.year + 1, pd.Timestamp.max.year - 1)


@pytest.mark.parametrize(("args", "message"), BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_exits_2_with_a_clear_message(bad_inputs: Path, store: Path, args: list[str], message: str) -> None:
    result = cli(*[a.format(tmp=bad_inputs) for a in args], "--config", str(store))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.stderr


def _week_label(day: datetime) -> str:
    year, week, _ = day.isocalendar()
    return f"{year}-W{week:02d}"


@pytest.fixture(scope="module")
def this_week_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store as `make run` leaves it: rounds from this week's Monday (UTC) or 3 hours ago,
    whichever is later, up to now; nothing in the last complete week."""
    tmp = tmp_path_factory.mktemp("new")
    now = datetime.now(UTC)
    monday = datetime.combine((now - timedelta(days=now.weekday())).date(), datetime.min.time(), UTC)
    start = max(monday, now - timedelta(hours=3))
    rounds = int((now - start) / timedelta(minutes=5))
    build_store(tmp / "tw.db", [(i, everything()) for i in range(rounds + 1)], start=start)
    return analysis_config(tmp, tmp / "tw.db", '[report]\ntimezone = "UTC"')


def test_weekly_charts_and_report_of_a_new_store_show_this_week_and_say_so(
    this_week_only: Path, tmp_path: Path
) -> None:
    """The last complete week holds no measurement: the current week so far is drawn, and
    standard error says which week and why."""
    now = datetime.now(UTC)
    this, last = _week_label(now), _week_label(now - timedelta(days=7))
    monday = now - timedelta(days=now.weekday())
    said = f"{last}, the last complete week, holds no measurement: the current week so far instead"
    charts = cli("chart", "weekly", "--config", str(this_week_only), "--out", str(tmp_path / "charts"))
    assert charts.returncode == 0, charts.stderr
    assert said in charts.stderr and f"{this}: Mon {monday:%Y-%m-%d} 00:00 to " in charts.stderr
    assert (tmp_path / "charts" / f"availability-{this}.png").exists()
    report = cli("report", "weekly", "--config", str(this_week_only), "--out", str(tmp_path / "week.html"))
    assert report.returncode == 0, report.stderr
    assert said in report.stderr and f"tunnelwatch weekly report {this}" in (tmp_path / "week.html").read_text()


def test_the_default_week_and_the_current_week_are_read_from_one_clock(
    this_week_only: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sunday 23:59:59 when the last complete week is chosen, Monday 00:00:01 when the current
    one is: still the week that just ended is drawn, never a new week of one second."""
    import analysis.cli
    import analysis.report
    from analysis.cli import _week
    from probe.config import load_config

    readings = iter([datetime(2026, 11, 29, 23, 59, 59, tzinfo=UTC), datetime(2026, 11, 30, 0, 0, 1, tzinfo=UTC)])

    class Clock(datetime):
        @classmethod
        def now(cls, tz: typing.Any = None) -> Clock:
            return typing.cast(Clock, next(readings).astimezone(tz))

    monkeypatch.setattr(analysis.cli, "datetime", Clock)
    monkeypatch.setattr(analysis.report, "datetime", Clock)
    monkeypatch.setattr(analysis.report, "measured_weeks", lambda cfg, tz: [])
    asked: list[str] = []

    def measure(w: analysis.report.Week) -> str:
        asked.append(w.label)
        return w.label

    chosen, _ = _week(load_config(this_week_only), None, None, None, "UTC", measure, lambda label: label == "2026-W48")
    assert asked == ["2026-W47", "2026-W48"]  # the last complete week, then the week so far
    assert chosen.label == "2026-W48"


def test_a_week_without_measurements_names_the_weeks_with_them(this_week_only: Path, tmp_path: Path) -> None:
    result = cli("chart", "weekly", "--config", str(this_week_only), "--week", "2018-W10", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (
        "2018-W10: Mon 2018-03-05 to Sun 2018-03-11 (UTC): no measurement; the store holds measurements in "
        f"{_week_label(datetime.now(UTC))} (choose a week with --week)"
    ) in result.stderr


def test_store_compact_then_the_same_answers(store: Path, tmp_path: Path) -> None:
    """Compaction as the daemon runs it: old raw rows go, `outages` and `events check` say
    what they said before."""
    copy = tmp_path / "copy.toml"
    db = tmp_path / "tw.db"
    db.write_bytes((store.parent / "tw.db").read_bytes())
    copy.write_text(store.read_text().replace(str(store.parent / "tw.db"), str(db)))
    asks = [("outages", "--format", "json"), ("events", "check", "--format", "json")]
    before = [cli(*ask, "--config", str(copy)).stdout for ask in asks]
    text = copy.read_text().replace("[store]", "[store]\nkeep_raw_days = 1")
    copy.write_text(text)
    result = cli("store", "compact", "--config", str(copy))
    assert result.returncode == 0, result.stderr
    assert re.search(r"summarised 9\d\d hours; deleted [1-9]\d* raw measurements older than 1 days", result.stderr)
    assert [cli(*ask, "--config", str(copy)).stdout for ask in asks] == before
    assert before[0] and before[1]


def test_store_compact_without_a_store_says_so(tmp_path: Path) -> None:
    config = analysis_config(tmp_path, tmp_path / "none.db", "")
    result = cli("store", "compact", "--config", str(config))
    assert result.returncode == 2
    assert f"{tmp_path / 'none.db'}: no store there" in result.stderr and "Traceback" not in result.stderr


GTRENDS = shared_data() / "gtrends_vpn_cn.csv"


def test_events_check_on_google_trends_finds_the_4_june_2019_spike(store: Path) -> None:
    """The shared Google Trends "VPN" series for China, 2011-2024, its zeros missing (Google's
    privacy threshold): the 30th anniversary of 4 June stands out against the series' own
    ordinary dates; 2015, when most days are zeros, cannot be judged and says so."""
    found = {}
    for event in ("june-4-2019", "june-4-2015"):
        result = cli(
            "events",
            "check",
            "--config",
            str(store),
            "--series",
            str(GTRENDS),
            "--column",
            "value",
            "--missing",
            "0",
            "--before",
            "3d",
            "--after",
            "2d",
            "--event",
            event,
            "--format",
            "json",
        )
        assert result.returncode == 0, result.stderr
        found.update({c["event"]: c for c in map(json.loads, result.stdout.splitlines())})
    spike = found["june-4-2019"]
    assert spike["verdict"].startswith("effect: ") and "(spike)" in spike["verdict"], spike
    assert spike["ratio"] > 1.8 and spike["ci_low"] > 1 and spike["placebos"] > 500
    assert found["june-4-2015"]["verdict"] == "not evaluable: 6 of 6 window days missing"
