"""External series read from CSV files: a chunk at a time, summed into hours, bad lines named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import series as reader
from analysis.eventcheck import binned_series, external_series
from probe.errors import ConfigError

START = pd.Timestamp("2019-07-01", tz="UTC")


def minutes_csv(path: Path, days: int, seed: int = 1) -> pd.Series:
    """A series a minute apart, with a text column the reader must skip and a few gaps."""
    times = pd.date_range(START, periods=days * 24 * 60, freq="min")
    values = pd.Series(np.round(np.random.default_rng(seed).normal(1000, 50, len(times)), 2), index=times)
    values.iloc[100:400] = np.nan  # missing values: an hour or so without any
    text = np.where(values.isna(), "", values.astype(str))
    lines = [f"{t:%Y-%m-%dT%H:%M:%SZ},cn,{v}" for t, v in zip(times, text, strict=True)]
    path.write_text("date,country,users\n" + "\n".join(lines) + "\n")
    return values


def test_a_minute_series_read_in_chunks_is_the_hourly_mean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = minutes_csv(tmp_path / "m.csv", days=3)
    monkeypatch.setattr(reader, "CHUNK_ROWS", 997)  # chunk boundaries fall inside hours
    hours = reader.read_series(tmp_path / "m.csv", "users")
    series = binned_series(hours.sums)
    expected = values.resample("1h").mean()
    assert series.step == pd.Timedelta(hours=1) and series.start == START
    assert np.allclose(series.value, expected.fillna(0).to_numpy())
    assert series.exposure.tolist() == expected.notna().astype(float).tolist()
    assert (hours.first, hours.last) == (values.index[0], values.index[-1])


def test_since_and_until_keep_the_rows_between(tmp_path: Path) -> None:
    minutes_csv(tmp_path / "m.csv", days=3)
    since, until = START + pd.Timedelta(hours=30), START + pd.Timedelta(hours=40)
    hours = reader.read_series(tmp_path / "m.csv", "users", since, until)
    assert (hours.first, hours.last) == (since, until - pd.Timedelta(minutes=1))
    assert hours.sums.index.tolist() == list(pd.date_range(since, until, freq="h", inclusive="left"))
    with pytest.raises(ConfigError, match="no dated rows in that range"):
        reader.read_series(tmp_path / "m.csv", "users", START + pd.Timedelta(days=9))


def test_a_daily_export_reads_as_before(tmp_path: Path) -> None:
    """Tor Metrics' daily export (an unnamed index column, dates, a country): the same
    daily series as the frame it holds."""
    days = pd.date_range(START, periods=60, freq="D")
    users = pd.Series(1000.0 + np.arange(60) % 7, index=days)
    rows = [f"{i},{d:%Y-%m-%d},cn,{u:g},1.0,2.0,80" for i, (d, u) in enumerate(users.items())]
    (tmp_path / "tor.csv").write_text(",date,country,users,lower,upper,frac\n" + "\n".join(rows) + "\n")
    read = binned_series(reader.read_series(tmp_path / "tor.csv", "users").sums)
    direct = external_series(users.to_frame("users"), "users")
    assert read.step == direct.step == pd.Timedelta(days=1)
    assert read.start == direct.start and np.array_equal(read.value, direct.value)
    assert np.array_equal(read.exposure, direct.exposure)


def test_a_bad_value_past_the_first_chunk_is_named_by_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [f"{START + pd.Timedelta(hours=h):%Y-%m-%d %H:%M},{h}" for h in range(3000)]
    lines[2345] = lines[2345].split(",")[0] + ",n/a?"
    lines.insert(10, "")  # a blank line still counts as a line
    (tmp_path / "s.csv").write_text("time,users\n" + "\n".join(lines) + "\n")
    monkeypatch.setattr(reader, "CHUNK_ROWS", 1000)
    with pytest.raises(ConfigError, match=r"s\.csv: line 2348: users 'n/a\?' is not a finite number"):
        reader.read_series(tmp_path / "s.csv", "users")


def test_a_long_line_is_refused_where_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound holds inside the parser's reads, not only for the header: a line longer
    than the bound is named however the reads fall."""
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 100)
    lines = ["2019-07-01,1"] * 50 + ["2019-07-02," + "7" * 150] + ["2019-07-03,2"] * 50
    (tmp_path / "s.csv").write_text("date,users\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"s\.csv: line 52: longer than 100 bytes"):
        reader.read_series(tmp_path / "s.csv", "users")
    (tmp_path / "s.csv").write_text("date,users\n" + "\n".join(lines[:50]) + "\n" + "9" * 150)  # no line end
    with pytest.raises(ConfigError, match=r"s\.csv: line 52: longer than 100 bytes"):
        reader.read_series(tmp_path / "s.csv", "users")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "line 1 is empty"),
        ("date,users\n", "no dated rows"),
        ("date,users\n2019-07-01,\n2019-07-02,\n", "column 'users' has no values"),
        ("date,users\n2019-07-01,true\n2019-07-02,false\n", "line 2: users 'True' is not a finite number"),
        ("date,users\n,5\n", "line 2: date is empty"),
        ("date,users\n1561939200,5\n", "line 2: date '1561939200' is not a date"),
        (
            "date,users\n2019-07-01,5\n\xff\n",
            "line 3: byte 0xff at column 1 is not UTF-8 text; a series is a CSV file in UTF-8",
        ),
        (
            'date,users\n2019-07-01,5\n2019-07-02,"6\n2019-07-03,7\n',
            "line 3: a quote .* opens a field that no quote closes",
        ),
        (
            "date,users,note\n2019-07-01\n2019-07-02,6,x\n",
            "line 2: 1 field, but the header names 3 .* a field for 'users'",
        ),
        ("day,users\n2019-07-01,5\n", "column 'day' is the date column"),
    ],
)
def test_what_cannot_be_a_series_is_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "s.csv").write_bytes(text.encode("latin-1"))  # \xff: a byte that is not UTF-8
    column = "day" if text.startswith("day") else "users"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        reader.read_series(tmp_path / "s.csv", column)
