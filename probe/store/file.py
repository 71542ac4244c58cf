"""The file under a SQLite store: whether SQLite finds it damaged, whether the path still
names the file a connection has open, and the lock that keeps one daemon per store.

A damaged store is looked for at two costs. `look_over` is what every open does: the
header, the schema's b-tree and the newest entry of every table and index, a few dozen
pages whatever the size of the file (a few ms, for 1.3 GB as for a tiny store).
`SQLiteStore.verify` is PRAGMA quick_check of every page (some 10 s for 1.3 GB): the daemon
runs it in the background before its first write, `tunnelwatch probe` while its round
probes. Damage that neither saw is an error of the read or write that meets it
(`store_error`), never a traceback, and connections set PRAGMA cell_size_check so that a
damaged page is an error when read rather than rows read wrong.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path
from typing import Any

from probe.errors import StoreError


class StoreLost(StoreError):
    """The file at the store's path is not the store that was opened any more: deleted,
    replaced by another file, or damaged. The daemon's writer then reopens the store."""

    def __init__(self, path: Path, reason: str, detail: str, advice: str = "") -> None:
        super().__init__(f"{path}: {detail}{advice}")
        self.path = path
        self.reason = reason  # "deleted", "replaced" or "damaged"
        self.detail = detail


class StoreDamaged(StoreLost):
    """SQLite finds the file damaged (SQLITE_CORRUPT, SQLITE_NOTADB): commands refuse it."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(
            path,
            "damaged",
            f"the store is damaged ({what})",
            f"; its readable rows can be saved with `sqlite3 {path} .recover | sqlite3 {path}.recovered`, and "
            "`tunnelwatch run` moves a damaged store aside and starts a fresh one",
        )


def is_damage(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def store_error(path: Path | str, exc: sqlite3.Error, doing: str) -> StoreError:
    """A SQLite error as the user sees it: damage says so and how to save the rows; anything
    else what could not be done."""
    if is_damage(exc):
        return StoreDamaged(Path(path), str(exc))
    return StoreError(f"{path}: cannot {doing}: {exc}")


def look_over(db: sqlite3.Connection) -> str | None:
    """What is wrong with a store, at a look whose cost does not grow with the file: the
    header (SQLite refuses a file that is not a database), the b-tree of the schema, and the
    newest entry of every table and index, the pages rows are appended to and read first.
    Damage elsewhere is found by `SQLiteStore.verify` or by the read that meets it. None when
    nothing is found."""
    try:
        if (found := quick_check(db, "'sqlite_schema'")) != "ok":
            return found
        tables = db.execute(
            "SELECT name, wr FROM pragma_table_list WHERE schema = 'main' AND type = 'table' "
            "AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        for table, without_rowid in tables:
            if not without_rowid:
                db.execute(f'SELECT * FROM "{table}" ORDER BY rowid DESC LIMIT 1').fetchall()
            for (index,) in db.execute("SELECT name FROM pragma_index_list(?)", [table]).fetchall():
                first = db.execute("SELECT name FROM pragma_index_info(?) WHERE seqno = 0", [index]).fetchone()
                if first and first[0]:
                    db.execute(f'SELECT max("{first[0]}") FROM "{table}"').fetchall()  # the index's last page
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            return str(exc)
        raise
    return None


def quick_check(db: sqlite3.Connection, scope: str) -> str:
    """PRAGMA quick_check(scope) on one line: "ok", or what it found."""
    rows = db.execute(f"PRAGMA quick_check({scope})").fetchall()
    return "; ".join(line for (row,) in rows for line in row.splitlines() if not line.startswith("***"))


def identity(path: Path | str) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, None when there is none: the same path may
    name another file than the one a connection has open."""
    try:
        stat = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return stat.st_dev, stat.st_ino


class StoreLock:
    """One daemon per store: an exclusive flock on `<store>.lock`, held while the daemon runs.
    The kernel releases it when the process dies, however it dies."""

    def __init__(self, store_path: Path) -> None:
        self.store_path = store_path
        self.path = store_path.with_name(store_path.name + ".lock")
        self._file: Any = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.path.open("a+")
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the store's lock file: {exc}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StoreError(
                f"{self.store_path}: another tunnelwatch daemon (pid {holder}) is using this store; "
                "stop it first, or give this one another store.path"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def follow(self) -> None:
        """Lock the lock file now at the path if it is not the one held (it went with the
        store's directory): a second daemon started on the path is still refused."""
        held = self._file
        if held is None:
            return
        stat = os.fstat(held.fileno())
        if identity(self.path) == (stat.st_dev, stat.st_ino):
            return
        self._file = None
        try:
            self.acquire()
        except StoreError:
            self._file = held
            raise
        held.close()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
