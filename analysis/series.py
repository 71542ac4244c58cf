"""External series for `tunnelwatch events check --series`: a CSV export (a date column and
value columns) read with bounded memory and time.

A CSV can be anything: a header of millions of columns, gigabytes of rows a minute apart,
words where numbers should be. The header is read first, up to MAX_HEADER_BYTES and
MAX_COLUMNS; then only the date column and the value column are parsed, CHUNK_ROWS rows at
a time, and each chunk is summed into hours at once, so memory follows the hours the series
spans, never its rows; no line may be longer than MAX_LINE_BYTES. What cannot be a series
(no date column, a value that is not a number, a date that is not a date, a byte that is not
UTF-8, a quote never closed) is a ConfigError naming the file, the line, the column, the bad
value and what would be valid.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

import numpy as np
import pandas as pd

from probe.errors import ConfigError

from .eventcheck import hour_sums

if TYPE_CHECKING:
    from pandas._typing import ReadCsvBuffer

MAX_HEADER_BYTES = 1 << 20
MAX_COLUMNS = 10_000
MAX_LINE_BYTES = 1 << 20
CHUNK_ROWS = 500_000
# measurement_start_day: the day column of OONI's aggregation API (CSV with axis_x=measurement_start_day)
TIME_COLUMNS = ("date", "day", "datetime", "time", "timestamp", "measurement_start_day")
VALID_DATES = (
    "an ISO 8601 date or time, e.g. 2019-07-01, 2019-07-01 13:00 or 2019-07-01T13:00+08:00 "
    "(UTC unless it has an offset)"
)


@dataclass(frozen=True, slots=True)
class Hours:
    """A series summed into hours: `sum` and `count` of the values of each hour (UTC) that
    has one, and the first and last date of the rows read."""

    sums: pd.DataFrame
    first: pd.Timestamp
    last: pd.Timestamp


def read_series(
    path: Path,
    column: str,
    since: pd.Timestamp | None = None,
    until: pd.Timestamp | None = None,
    missing: Sequence[float] = (),
) -> Hours:
    """The rows of `path` dated in [since, until), `column`'s values summed into hours;
    values in `missing` (Google Trends' zeros) are missing, as empty cells are."""
    names = _header(path)
    lowered = [n.lower() for n in names]
    time_at = next((lowered.index(n) for n in TIME_COLUMNS if n in lowered), None)
    if time_at is None:
        raise ConfigError(f"{path}: no date column among {_listed(names)}; name one of {', '.join(TIME_COLUMNS)}")
    if column not in names:
        raise ConfigError(f"{path}: no column {column!r}; columns: {_listed(names)}")
    value_at = names.index(column)
    if value_at == time_at:
        raise ConfigError(f"{path}: column {column!r} is the date column; the values must be in another")
    parts, first, last, line = [], None, None, 2  # the header is line 1
    with path.open("rb") as raw:
        for chunk in _chunks(path, raw, names, time_at, value_at):
            times, values = _parse(path, line, names[time_at], column, chunk[time_at], chunk[value_at])
            values = values.mask(values.isin(missing))
            line += len(chunk)
            keep = times.notna()
            if since is not None:
                keep &= times >= since
            if until is not None:
                keep &= times < until
            if keep.any():
                first = min(first, times[keep].min()) if first is not None else times[keep].min()
                last = max(last, times[keep].max()) if last is not None else times[keep].max()
                parts.append(hour_sums(pd.DatetimeIndex(times[keep]), values[keep]))
    within = "" if since is None and until is None else " in that range"
    if first is None or last is None:
        raise ConfigError(f"{path}: no dated rows{within}")
    sums = pd.concat(parts).groupby(level=0).sum()
    sums = sums[sums["count"] > 0]
    if sums.empty:
        raise ConfigError(f"{path}: column {column!r} has no values{within}")
    return Hours(sums, first, last)


def _listed(names: list[str], most: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most:,} more" if len(names) > most else "")


def _chunks(path: Path, raw: BinaryIO, names: list[str], time_at: int, value_at: int) -> Iterator[pd.DataFrame]:
    """The rows under the header, CHUNK_ROWS at a time, the date column as text. What the
    parser cannot read is a ConfigError naming the line and what is wrong with it: the
    parser's own words count rows, not lines, and quote no text."""
    try:
        yield from pd.read_csv(
            cast("ReadCsvBuffer[bytes]", _BoundedLines(raw, path)),  # the C parser calls read() only
            header=None,
            skiprows=1,
            usecols=[time_at, value_at],
            dtype={time_at: str},
            chunksize=CHUNK_ROWS,
            skip_blank_lines=False,
        )
    except pd.errors.EmptyDataError:
        return  # nothing under the header: no dated rows
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # the parser's: a byte that is not UTF-8, a quote never closed, a short first row
        raise ConfigError(f"{path}: {_unreadable(path, exc, names, max(time_at, value_at))}") from None


def _unreadable(path: Path, error: ValueError, names: list[str], needed: int) -> str:
    """Where the parser stumbled and why, found by reading the file again line by line."""
    example = "e.g. 2019-07-01,1234"
    with path.open("rb") as raw:
        lines = enumerate(iter(lambda: raw.readline(MAX_LINE_BYTES + 1), b""), start=1)
        if isinstance(error, UnicodeDecodeError):
            for number, line in lines:
                try:
                    line.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    return (
                        f"line {number}: byte {line[exc.start]:#04x} at column {exc.start + 1} is not UTF-8 text; "
                        "a series is a CSV file in UTF-8 (save it as CSV UTF-8)"
                    )
        elif isinstance(error, pd.errors.ParserError):
            opened = None  # the line of a quote still open
            for number, line in lines:
                if line.count(b'"') % 2:
                    opened = number if opened is None else None
            if opened is not None:
                return (
                    f'line {opened}: a quote (") opens a field that no quote closes; valid: a field in quotes '
                    'ends with a quote, and a quote inside it is doubled, e.g. 2019-07-01,"1,234"'
                )
        else:
            for number, line in lines:
                if number == 2:
                    fields = next(csv.reader([line.decode("utf-8", "replace").rstrip("\r\n")]), [])
                    return (
                        f"line 2: {len(fields)} field{'' if len(fields) == 1 else 's'}, but the header names "
                        f"{len(names)} ({_listed(names)}): the first row must hold a field for {names[needed]!r} "
                        f"(empty for a missing value), {example}"
                    )
    return f"not a CSV series ({error}); valid: a header line, then one line a date, {example}"


def _header(path: Path) -> list[str]:
    """The column names, from a first line read up to MAX_HEADER_BYTES."""
    try:
        with path.open("rb") as raw:
            line = raw.readline(MAX_HEADER_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if len(line) > MAX_HEADER_BYTES:
        raise ConfigError(
            f"{path}: line 1: the header is longer than {MAX_HEADER_BYTES:,} bytes; a series needs a "
            "date column and a value column, e.g. date,users"
        )
    try:
        text = line.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: line 1: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ConfigError(f"{path}: line 1 is empty; the first line must name the columns, e.g. date,users")
    try:
        names = next(csv.reader([text]))
    except csv.Error as exc:
        raise ConfigError(f"{path}: line 1: not a CSV header: {exc}") from None
    if len(names) > MAX_COLUMNS:
        raise ConfigError(
            f"{path}: line 1: {len(names):,} columns; a series may have at most {MAX_COLUMNS:,} "
            "(a date column and value columns)"
        )
    return [n.strip() for n in names]


def _parse(
    path: Path, line: int, time_name: str, value_name: str, dates: pd.Series, raw: pd.Series
) -> tuple[pd.Series, pd.Series]:
    """One chunk's dates and values, or a ConfigError naming the first bad one; `line` is
    the chunk's first line. A row without a value is missing, one with neither is blank."""
    times = pd.to_datetime(dates, utc=True, errors="coerce", format="ISO8601")
    if pd.api.types.is_bool_dtype(raw):  # the parser read true/false: words, not numbers
        values = pd.Series(np.nan, index=raw.index)
    elif pd.api.types.is_numeric_dtype(raw):  # the parser read every value as a number
        values = raw.astype(float)
    else:
        values = pd.to_numeric(raw.astype(object), errors="coerce").astype(float)
    undated = times.isna() & (dates.notna() | values.notna())
    not_number = values.isna() & raw.notna()
    infinite = ~np.isfinite(values.fillna(0.0))
    bad = (undated | not_number | infinite).to_numpy()
    if bad.any():
        at = int(bad.nonzero()[0][0])
        where = f"{path}: line {line + at}"
        if undated.iloc[at]:
            text = dates.iloc[at]
            got = "is empty" if pd.isna(text) else f"{text!r} is not a date"
            raise ConfigError(f"{where}: {time_name} {got}; valid: {VALID_DATES}")
        raise ConfigError(
            f"{where}: {value_name} {str(raw.iloc[at])!r} is not a finite number; valid: a number such as "
            "1234 or 0.5, or nothing for a missing value"
        )
    return times, values


class _BoundedLines:
    """The file as the CSV parser reads it, refusing a line longer than MAX_LINE_BYTES
    before the parser holds it: one endless line cannot take the memory."""

    def __init__(self, raw: BinaryIO, path: Path) -> None:
        self._raw, self._path = raw, path
        self._open = 0  # bytes of the line not yet ended
        self._lines = 0  # lines ended so far

    def read(self, size: int = -1) -> bytes:
        block = self._raw.read(size if size and size > 0 else MAX_LINE_BYTES)
        ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == ord("\n"))
        if len(ends):
            lengths = np.diff(ends, prepend=-1 - self._open) - 1
            too_long = np.flatnonzero(lengths > MAX_LINE_BYTES)
            if len(too_long):
                self._fail(self._lines + int(too_long[0]) + 1)
            self._lines += len(ends)
            self._open = len(block) - int(ends[-1]) - 1
        else:
            self._open += len(block)
        if self._open > MAX_LINE_BYTES:
            self._fail(self._lines + 1)
        return block

    def _fail(self, line: int) -> None:
        raise ConfigError(
            f"{self._path}: line {line}: longer than {MAX_LINE_BYTES:,} bytes; a series has a date and "
            "a few values a line"
        )
