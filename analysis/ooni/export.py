"""Export: the store's measurements, with their verdicts, as OONI measurements (JSON lines),
CSV or Parquet, in bounded memory.

The store is read a window of rounds at a time (`WINDOW`, whole probing intervals): the
rows of the window and a round's spread either side, so that verdicts, which compare the
paths of a round and the control targets of a slot (analysis/verdicts.py), are judged as
`outages` judges them; then the rounds that began in the window are written and the next
window is read. Empty stretches are skipped with one indexed query. Only raw rows can be
exported: before the store's compaction cursor there are summaries only (`raw_since`).
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import pandas as pd

from probe.errors import StoreError
from probe.store.schema import MEASUREMENT_COLUMNS, to_ms

from ..frames import ROUND_SPAN, Source, _connect, _db_errors, _read_error, load_paths
from ..verdicts import classify
from .record import PathInfo, Probe, measurement

WINDOW = pd.Timedelta(hours=6)
LINES_AT_ONCE = 2000
VERDICT = ("state", "verdict", "rule", "blocking", "detail")
# The verdict's columns beside the row's (which has a `detail` of its own).
VERDICT_AS = {
    "state": "verdict_state",
    "verdict": "verdict",
    "rule": "rule",
    "blocking": "blocking",
    "detail": "verdict_detail",
}
# CSV and Parquet columns: the stored row (times as UTC times, `grp` as `group`) and its verdict.
ROW_COLUMNS = tuple(
    {"grp": "group", "started_at_ms": "started_at", "cert_not_after_ms": "cert_not_after"}.get(c, c)
    for c in MEASUREMENT_COLUMNS
)
EXPORT_COLUMNS = (*ROW_COLUMNS, *VERDICT_AS.values())


@dataclass
class Counts:
    measurements: int = 0  # read, with their verdicts
    written: int = 0  # of the targets and paths asked for
    windows: int = 0
    raw_since: pd.Timestamp | None = None  # the oldest raw row
    first: pd.Timestamp | None = None
    last: pd.Timestamp | None = None
    paths: dict[str, PathInfo] = field(default_factory=dict)


def _scalar(conn: Any, sql: str, args: Sequence[object]) -> Any:
    row = conn.execute(sql, list(args)).fetchone()
    return row[0] if row else None


def _mine(source: Source) -> tuple[str, list[object]]:
    return (" AND vantage = ?", [source.vantage]) if source.vantage is not None else ("", [])


def windows(
    source: Source,
    since: datetime | None,
    until: datetime | None,
    slot_s: float,
    *,
    window: pd.Timedelta = WINDOW,
    counts: Counts | None = None,
) -> Iterator[pd.DataFrame]:
    """The stored rows whose round began in [since, until), a window at a time, each with its
    verdict (VERDICT columns; endpoint probes have none). Columns as MEASUREMENT_COLUMNS."""
    counts = counts if counts is not None else Counts()
    slot_ms = max(1, round(slot_s * 1000))
    window_ms = max(1, math.ceil(window.total_seconds() * 1000 / slot_ms)) * slot_ms
    span_ms = int(ROUND_SPAN.total_seconds() * 1000)
    lo = to_ms(since) if since is not None else -(2**62)
    hi = to_ms(until) if until is not None else 2**62
    mine, mine_args = _mine(source)
    paths = load_paths(source)
    counts.paths = {
        str(r.name): PathInfo(str(r.kind), _text(r.label), _text(r.endpoint_target)) for r in paths.itertuples()
    }
    conn = _connect(source)
    select = f"SELECT {', '.join(MEASUREMENT_COLUMNS)} FROM measurements"
    try:
        oldest = _scalar(conn, f"SELECT MIN(started_at_ms) FROM measurements WHERE 1 = 1{mine}", mine_args)
        counts.raw_since = None if oldest is None else pd.Timestamp(oldest, unit="ms", tz="UTC")
        nxt = _scalar(
            conn, f"SELECT MIN(started_at_ms) FROM measurements WHERE started_at_ms >= ?{mine}", [lo, *mine_args]
        )
        while nxt is not None and nxt < hi:
            start = nxt - nxt % slot_ms
            end = start + window_ms
            rows = conn.execute(
                f"{select} WHERE started_at_ms >= ? AND started_at_ms < ?{mine} ORDER BY started_at_ms",
                [start - span_ms, end + span_ms, *mine_args],
            ).fetchall()
            frame = _judged(pd.DataFrame.from_records(rows, columns=list(MEASUREMENT_COLUMNS)), paths, slot_s)
            first = frame.groupby("round_id")["started_at_ms"].transform("min")
            inside = (first >= max(start, lo)) & (first < min(end, hi))
            kept = frame[inside]
            if len(kept):
                counts.windows += 1
                counts.measurements += len(kept)
                yield kept.assign(round_start_ms=first[inside])
            nxt = _scalar(
                conn, f"SELECT MIN(started_at_ms) FROM measurements WHERE started_at_ms >= ?{mine}", [end, *mine_args]
            )
    except _db_errors(conn) as exc:
        raise _read_error(source, exc, "read measurements") from None
    finally:
        conn.close()


def _text(value: Any) -> str:
    return "" if value is None or pd.isna(value) else str(value)


def _judged(frame: pd.DataFrame, paths: pd.DataFrame, slot_s: float) -> pd.DataFrame:
    """The rows with the verdict `classify` gives each (analysis reads the same columns)."""
    view = pd.DataFrame(
        {
            "round_id": frame["round_id"].astype(str),
            "target": frame["target"].astype(str),
            "group": frame["grp"].astype(str),
            "path": frame["path"].astype(str),
            "kind": frame["kind"].astype(str),
            "started_at": pd.to_datetime(frame["started_at_ms"], unit="ms", utc=True),
            "ok": frame["ok"].astype(bool),
            "failure": frame["failure"].astype(object),
            "failed_operation": frame["failed_operation"].astype(object),
            "connect_ms": frame["connect_ms"].astype("float64"),
            "first_byte_ms": frame["first_byte_ms"].astype("float64"),
            "addresses": frame["addresses"].astype(str),
            "status": frame["status"].astype("Int64"),
            "body_length": frame["body_length"].astype("Int64"),
            "title": frame["title"].astype(object),
        }
    )
    verdicts = classify(view, paths, slot_s)[["round_id", "target", "path", *VERDICT]].rename(columns=VERDICT_AS)
    return frame.merge(verdicts, on=["round_id", "target", "path"], how="left")


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows as dicts of Python values, None where pandas has NaN or NA."""
    columns = [str(c) for c in frame.columns]
    values = [frame[c].astype(object).where(frame[c].notna(), None).tolist() for c in frame.columns]
    return [dict(zip(columns, row, strict=True)) for row in zip(*values, strict=True)]


def _verdict(row: dict[str, Any]) -> dict[str, Any] | None:
    if row["verdict"] is None:
        return None  # an endpoint probe: evidence for its tunnel's verdicts, judged by none
    verdict = {c: row[VERDICT_AS[c]] for c in VERDICT}
    verdict["detail"] = verdict["detail"] or ""
    return verdict


INTEGERS = ("started_at_ms", "status", "body_length", "cert_not_after_ms")


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """A row's values as they were stored: numbers that pandas made floats back to integers."""
    for column in ("ok", "tls_verified"):
        if record[column] is not None:
            record[column] = bool(record[column])
    for column in INTEGERS:
        if record[column] is not None:
            record[column] = int(record[column])
    return record


def write_ooni(
    chunks: Iterator[pd.DataFrame], out: IO[str], probes: dict[str, Probe], software_version: str, counts: Counts
) -> None:
    """One JSON object a line, made LINES_AT_ONCE rows at a time (a window's dicts and lines
    all at once would double the peak)."""
    for chunk in chunks:
        for at in range(0, len(chunk), LINES_AT_ONCE):
            lines = []
            for record in _records(chunk.iloc[at : at + LINES_AT_ONCE]):
                row = _row(record)
                lines.append(
                    json.dumps(
                        measurement(
                            row,
                            probe=probes.get(row["vantage"]) or Probe.named(row["vantage"]),
                            path=counts.paths.get(row["path"], PathInfo()),
                            round_start_ms=int(row["round_start_ms"]),
                            verdict=_verdict(row),
                            software_version=software_version,
                            addresses=json.loads(row["addresses"] or "[]"),
                        ),
                        separators=(",", ":"),
                        ensure_ascii=False,
                    )
                )
            out.write("\n".join(lines) + "\n")


def rows_frame(chunk: pd.DataFrame) -> pd.DataFrame:
    """A window's rows as the CSV and Parquet files hold them (EXPORT_COLUMNS)."""
    frame = chunk.rename(
        columns={
            "grp": "group",
            "started_at_ms": "started_at",
            "cert_not_after_ms": "cert_not_after",
        }
    )
    frame["started_at"] = pd.to_datetime(frame["started_at"], unit="ms", utc=True)
    frame["cert_not_after"] = pd.to_datetime(frame["cert_not_after"], unit="ms", utc=True)
    frame["ok"] = frame["ok"].astype(bool)
    frame["tls_verified"] = frame["tls_verified"].astype("boolean")
    for column in ("status", "body_length"):
        frame[column] = frame[column].astype("Int64")
    for column in ("resolve_ms", "proxy_ms", "connect_ms", "tls_ms", "first_byte_ms", "total_ms", "loop_lag_ms"):
        frame[column] = frame[column].astype("float64")
    return frame[list(EXPORT_COLUMNS)]


def write_csv(chunks: Iterator[pd.DataFrame], out: IO[str]) -> None:
    header = True
    for chunk in chunks:
        frame = rows_frame(chunk)
        frame["started_at"] = frame["started_at"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").str.slice(0, 23) + "Z"
        frame.to_csv(out, index=False, header=header, quoting=csv.QUOTE_MINIMAL)
        header = False
    if header:  # nothing exported: the header alone
        out.write(",".join(EXPORT_COLUMNS) + "\n")


def parquet_schema() -> Any:
    import pyarrow as pa  # type: ignore[import-untyped]  # no type information published

    text = {c: pa.string() for c in EXPORT_COLUMNS}
    times = pa.timestamp("ms", tz="UTC")
    types = text | {
        "started_at": times,
        "cert_not_after": times,
        "ok": pa.bool_(),
        "tls_verified": pa.bool_(),
        "status": pa.int64(),
        "body_length": pa.int64(),
    }
    for column in ("resolve_ms", "proxy_ms", "connect_ms", "tls_ms", "first_byte_ms", "total_ms", "loop_lag_ms"):
        types[column] = pa.float64()
    return pa.schema([(c, types[c]) for c in EXPORT_COLUMNS])


def write_parquet(chunks: Iterator[pd.DataFrame], path: Path) -> None:
    """One row group per window, written as it comes."""
    import pyarrow as pa
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    schema = parquet_schema()
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for chunk in chunks:
            writer.write_table(pa.Table.from_pandas(rows_frame(chunk), schema=schema, preserve_index=False))


def open_text(path: Path | None) -> IO[str]:
    """The output: a file (gzip when its name ends in .gz), or standard output."""
    import sys

    if path is None:
        return sys.stdout
    try:
        if path.name.endswith(".gz"):
            return gzip.open(path, "wt", compresslevel=6, encoding="utf-8", newline="\n")
        return path.open("w", encoding="utf-8", newline="\n")
    except OSError as exc:
        raise StoreError(f"{path}: cannot write the export: {exc.strerror or exc}") from None
