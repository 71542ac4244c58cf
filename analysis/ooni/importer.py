"""`tunnelwatch import ooni`: OONI measurements from files into a SQLite store, once each.

A file holds one JSON object (as OONI's API and its test data give them, pretty-printed or
not), a JSON list of them, or JSON lines (as OONI's S3 buckets and `tunnelwatch export`
write them); gzip-compressed or not (told by its first bytes); a directory stands for the
files under it. JSON lines are read one at a time, so a file of any size is read in bounded
memory. A line that is not a measurement is reported with its file and line and the rest
go on; measurements of tests this does not read are counted and skipped.

Rows are written as compaction.py writes a store (the store opened by SQLiteStore first, so
its schema is created or migrated), a batch a transaction. A measurement is stored once: a
row already there with the same time, round (the measurement's key, mapping.round_of),
target and path is not written again (looked up by the store's index on the time).
"""

from __future__ import annotations

import gzip
import json
import sqlite3
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from probe.store.file import store_error
from probe.store.schema import HEARTBEAT_COLUMNS, MEASUREMENT_COLUMNS, PATH_COLUMNS, from_ms
from probe.store.sqlite import writable

from .mapping import Imported, Malformed, Unknown, from_ooni

BATCH = 2000  # measurements a transaction
WHOLE_FILE_LIMIT = 256 * 1024 * 1024  # a file that is one JSON document is read whole: up to this


@dataclass
class Result:
    files: int = 0
    measurements: int = 0  # OONI measurements written
    rows: int = 0
    duplicates: int = 0  # already in the store
    skipped: Counter[str] = field(default_factory=Counter)  # test name -> measurements
    problems: list[str] = field(default_factory=list)
    vantages: set[str] = field(default_factory=set)
    before_cursor: int = 0  # rows older than the store's summaries
    cursor_ms: int | None = None

    def summary(self, store: Path) -> str:
        parts = [
            f"imported {self.measurements:,} measurements ({self.rows:,} rows) from {self.files} files into {store}"
        ]
        if self.vantages:
            parts.append(f"vantage points: {', '.join(sorted(self.vantages))}")
        if self.duplicates:
            parts.append(f"{self.duplicates:,} were there already")
        if self.skipped:
            tests = ", ".join(f"{name} ({n})" for name, n in sorted(self.skipped.items()))
            parts.append(f"skipped {sum(self.skipped.values()):,} of tests not read: {tests}")
        if self.problems:
            parts.append(f"{len(self.problems)} lines or files could not be read (above)")
        if self.before_cursor and self.cursor_ms is not None:
            parts.append(
                f"warning: {self.before_cursor:,} rows are older than the store's summaries "
                f"(up to {from_ms(self.cursor_ms):%Y-%m-%d %H:%M} UTC), which analysis reads instead: "
                "import into a store of their own to analyse them"
            )
        return "; ".join(parts)


def files_of(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def _open(path: Path) -> IO[str]:
    with path.open("rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open("r", encoding="utf-8", errors="replace")


def read(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, measurement or Malformed) for each measurement of a file: JSON lines one at a
    time; a file whose first line is not a whole JSON value is read as one document."""
    with _open(path) as text:
        first_line, first = 0, ""
        for first_line, first in enumerate(text, start=1):  # noqa: B007 (the line it stopped at is used)
            if first.strip():
                break
        else:
            return
        try:
            value = json.loads(first)
        except json.JSONDecodeError:
            value = None
        whole_line = first.strip().startswith("{") and first.strip().endswith("}")
        if isinstance(value, dict) or whole_line:  # JSON lines, the first maybe malformed
            yield (
                first_line,
                value if isinstance(value, dict) else Malformed("not JSON: an object not closed as written"),
            )
            for number, line in enumerate(text, start=first_line + 1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, Malformed(f"not JSON: {exc.msg} at column {exc.colno}")
            return
        rest = text.read(WHOLE_FILE_LIMIT + 1)
    if len(rest) > WHOLE_FILE_LIMIT:
        yield first_line, Malformed("neither JSON lines nor a JSON document under 256 MiB")
        return
    try:
        document = json.loads(first + rest)
    except json.JSONDecodeError as exc:
        yield first_line + exc.lineno - 1, Malformed(f"not JSON: {exc.msg} at column {exc.colno}")
        return
    for item in document if isinstance(document, list) else [document]:
        yield first_line, item


EXISTS = "SELECT 1 FROM measurements WHERE started_at_ms = ? AND round_id = ? AND target = ? AND path = ? LIMIT 1"
INSERT_ROW = (
    f"INSERT INTO measurements ({', '.join(MEASUREMENT_COLUMNS)}) VALUES ({', '.join('?' * len(MEASUREMENT_COLUMNS))})"
)
INSERT_BEAT = f"INSERT OR IGNORE INTO heartbeats ({', '.join(HEARTBEAT_COLUMNS)}) VALUES ({', '.join('?' * len(HEARTBEAT_COLUMNS))})"
INSERT_PATH = f"INSERT OR IGNORE INTO paths ({', '.join(PATH_COLUMNS)}) VALUES ({', '.join('?' * len(PATH_COLUMNS))})"


def _write(conn: sqlite3.Connection, batch: list[Imported], result: Result) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for one in batch:
            new = [
                r
                for r in one.rows
                if conn.execute(EXISTS, (r["started_at_ms"], r["round_id"], r["target"], r["path"])).fetchone() is None
            ]
            if not new:
                result.duplicates += 1
                continue
            conn.executemany(INSERT_ROW, [tuple(r[c] for c in MEASUREMENT_COLUMNS) for r in new])
            targets = {r["target"] for r in one.rows}
            beat = {
                "round_id": one.round_id,
                "vantage": one.vantage,
                "started_at_ms": one.started_at_ms,
                "finished_at_ms": one.finished_at_ms,
                "probes": len(one.rows),
                "succeeded": sum(bool(r["ok"]) for r in one.rows),
                "config_sha256": "",
                "target": next(iter(targets)) if len(targets) == 1 else None,
                "scheduled_at_ms": None,
            }
            conn.execute(INSERT_BEAT, tuple(beat[c] for c in HEARTBEAT_COLUMNS))
            conn.executemany(INSERT_PATH, one.paths)
            result.measurements += 1
            result.rows += len(new)
            result.vantages.add(one.vantage)
            if result.cursor_ms is not None:
                result.before_cursor += sum(r["started_at_ms"] < result.cursor_ms for r in new)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def import_files(paths: Iterable[Path], db: Path) -> Result:
    """Read every measurement of the files into the store at `db`; what could not be read is
    in `problems`, each naming its file and line."""
    result = Result()
    conn = writable(db)
    try:
        row = conn.execute("SELECT until_ms FROM rollup_cursor").fetchone()
        result.cursor_ms = row[0] if row else None
        batch: list[Imported] = []
        for path in files_of(paths):
            result.files += 1
            try:
                for line, item in read(path):
                    try:
                        if isinstance(item, Malformed):
                            raise item
                        batch.append(from_ooni(item))
                    except Malformed as exc:
                        result.problems.append(f"{path}:{line}: {exc}")
                    except Unknown as exc:
                        result.skipped[str(exc.args[0])] += 1
                    if len(batch) >= BATCH:
                        _write(conn, batch, result)
                        batch = []
            except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
                result.problems.append(f"{path}: cannot read it: {getattr(exc, 'strerror', None) or exc}")
        if batch:
            _write(conn, batch, result)
    except sqlite3.Error as exc:
        raise store_error(db, exc, "import measurements") from None
    finally:
        conn.close()
    return result
