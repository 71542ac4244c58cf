"""`tunnelwatch events detect`: the ACSAC 2024 framework reproduced on its own China data, the
default detector on planted spikes, on noise and on the store's outages, the base rate."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from analysis.detect import NOISE_UNITS_PER_SIGNAL, baseline_signals
from probe.cli import app, main
from tests.analysis_data import analysis_config, build_store, everything, fail
from tests.servers import shared_data

ACSAC = shared_data() / "acsac"
DATASETS = {  # the paper's inputs, its column and its smoothing
    "tor": ("data/tor/tor-data-cn.csv", "users", ["--block", "5"]),
    "ooni": ("data/ooni/ooni-data-cn.csv", "total", ["--block", "5"]),
    "gfwatch": ("data/gfwatch/gfwatch-data-cn.csv", "count", ["--block", "5"]),
    "http": ("data/http/http-data-cn.csv", "ratio", []),
    "https": ("data/https/https-data-cn.csv", "ratio", []),
    "satellite": ("data/satellite/satellite-data-cn.csv", "ratio", []),
}
PUBLISHED_KINDS = {
    "MK Increasing": "increasing",
    "MK Decreasing": "decreasing",
    "CC Above": "above",
    "CC Below": "below",
}
DAY = timedelta(days=1)


def detect(*args: str) -> list[dict[str, object]]:
    result = CliRunner().invoke(app, ["events", "detect", *args, "--format", "json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_mann_kendall_reproduces_the_papers_china_signals() -> None:
    published = pd.read_csv(ACSAC / "results/all_signal_dates_cn.csv")
    found, total, extra = {}, 0, 0
    for dataset, (file, column, options) in DATASETS.items():
        signals = detect("--series", str(ACSAC / file), "--column", column, "--method", "mann-kendall", *options)
        theirs = published[published["Dataset"] == dataset]
        mine = [(pd.Timestamp(s["start"]), s["kind"]) for s in signals]
        hits = sum(
            any(
                kind == PUBLISHED_KINDS[row["Type"]] and abs(start - pd.Timestamp(row["Signal Start"])) <= DAY
                for start, kind in mine
            )
            for _, row in theirs.iterrows()
        )
        found[dataset] = (hits, len(theirs))
        total += len(theirs)
        extra += max(0, len(signals) - hits)
    assert total == 49
    assert sum(h for h, _ in found.values()) >= 0.95 * total, found
    assert extra <= 0.05 * total, f"{extra} signals the paper does not have; {found}"


def test_each_signal_lists_the_events_near_its_start_and_the_chance_of_that() -> None:
    https = detect(
        "--series",
        str(ACSAC / DATASETS["https"][0]),
        "--column",
        "ratio",
        "--method",
        "mann-kendall",
        "--category",
        "blocking-wave",
    )
    by_start = {s["start"]: s for s in https}
    # the paper's CC Above of 2022-08-18 and the Shadowsocks IP blocking reported from 2022-08-19
    assert by_start["2022-08-18"]["kind"] == "above"
    assert by_start["2022-08-18"]["events"] == ["shadowsocks-ip-blocking-2022"]
    assert by_start["2022-09-12"]["events"] == []
    # the blocking waves of 2021-01-01..2023-03-31, each widened by 3 days either side:
    # 2021-10-29..11-13 (16 days), 2022-08-16..08-25 (10), 2022-09-30..10-06 (7), 2023-03-04..03-18 (15)
    assert {s["base_rate"] for s in https} == {round(48 / 820, 4)}
    assert {s["within_days"] for s in https} == {3}


def _daily(values: np.ndarray, start: str = "2009-01-01") -> pd.DataFrame:
    return pd.DataFrame(
        {"date": pd.date_range(start, periods=len(values), freq="D").strftime("%Y-%m-%d"), "value": values}
    )


def test_the_default_detector_finds_planted_spikes_one_after_another(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    values = rng.normal(100, 5, 365)
    values[100:103] += 60  # a spike
    values[110:112] += 60  # and the next one, ten days on: the first must not hide it
    values[200:205] -= 40  # a drop
    values[300] += 80  # one day alone: not a signal
    _daily(values).to_csv(tmp_path / "series.csv", index=False)
    (tmp_path / "events.toml").write_text(
        '[[events]]\nid = "planted"\ntitle = "A planted spike"\ncategory = "policy"\nstart = 2009-04-13\n'
        "end = 2009-04-13\n"  # 2009-04-11 (day 100) is 2 days before
    )
    signals = detect(
        "--series", str(tmp_path / "series.csv"), "--column", "value", "--events", str(tmp_path / "events.toml")
    )
    assert [(s["start"], s["end"], s["kind"]) for s in signals] == [
        ("2009-04-11", "2009-04-13", "above"), ("2009-04-21", "2009-04-22", "above"),
        ("2009-07-20", "2009-07-24", "below"),
    ]  # fmt: skip
    assert signals[0]["events"] == ["planted"] and signals[1]["events"] == signals[2]["events"] == []
    assert all(s["peak_z"] > 3.5 or s["kind"] == "below" for s in signals)
    assert signals[2]["peak_z"] < -3.5 and abs(signals[2]["peak_baseline"] - 100) < 5
    assert {s["base_rate"] for s in signals} == {round(7 / 365, 4)}  # 2009-04-10..16 of 365 days


def test_the_default_detector_on_noise_stays_at_its_stated_rate() -> None:
    rng = np.random.default_rng(2024)
    units = 2 * NOISE_UNITS_PER_SIGNAL
    noise = pd.Series(rng.normal(100, 10, units), index=pd.date_range("2000-01-01", periods=units, freq="D"))
    # expected 2; more than 6 has a Poisson chance under 0.5 %, and the seed is fixed
    assert len(baseline_signals(noise)) <= 6


def test_missing_values_are_not_read_as_a_drop(tmp_path: Path) -> None:
    values = np.random.default_rng(3).normal(50, 3, 120)
    values[60:75] = 0  # Google Trends: not enough searches that fortnight
    _daily(values).to_csv(tmp_path / "trends.csv", index=False)
    args = ["--series", str(tmp_path / "trends.csv"), "--column", "value"]
    assert [(s["start"], s["kind"]) for s in detect(*args)] == [("2009-03-02", "below")]
    assert detect(*args, "--missing", "0") == []


def test_the_stores_outage_minutes_per_day(tmp_path: Path) -> None:
    down = {(t, "vpn"): fail("connection_refused", "proxy_connect") for t in ("news", "search", "portal", "shop")}
    crackdown = {day * 24 + hour for day in (25, 26) for hour in range(2, 10)}  # 2019-07-26 and -27, 8 hours each
    rounds = [(i, everything(down if i in crackdown else {})) for i in range(35 * 24)]
    build_store(tmp_path / "tw.db", rounds, start=datetime(2019, 7, 1, tzinfo=UTC), interval=timedelta(hours=1))
    config = analysis_config(tmp_path, tmp_path / "tw.db", "[probe]\ninterval_s = 3600")
    signals = detect("--config", str(config))
    assert [(s["start"], s["end"], s["kind"]) for s in signals] == [("2019-07-26", "2019-07-27", "above")]
    assert signals[0]["peak_value"] == pytest.approx(480, abs=5)  # the 8 hours of each day
    assert signals[0]["peak_baseline"] == 0 and signals[0]["peak_z"] is None  # against a flat baseline


@pytest.mark.parametrize(("args", "message"), [
    (["--series", "{dir}/s.csv"], "--series and --column go together"),
    (["--series", "{dir}/s.csv", "--column", "value", "--method", "mann-kendall", "--block", "5"],
     "s.csv: value: 6 values after blocks of 5; mann-kendall needs 10"),
    (["--series", "{dir}/s.csv", "--column", "value", "--missing", "none"], "'none' is not a valid float"),
    (["--series", "{dir}/s.csv", "--column", "users"], "no column 'users'"),
])  # fmt: skip
def test_bad_input_exits_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    _daily(np.arange(30.0)).to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(SystemExit) as exit:
        main(["events", "detect", *(a.format(dir=tmp_path) for a in args)])
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err


def test_help_loads_no_statistics_library() -> None:
    code = (
        "import sys; from click.testing import CliRunner; from probe.cli import app; "
        "[CliRunner().invoke(app, a) for a in (['--help'], ['events', 'detect', '--help'])]; "
        "print(sorted(m for m in ('pymannkendall', 'scipy', 'statsmodels') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
