"""A throwaway PostgreSQL cluster: initdb and pg_ctl from Debian's `postgresql`, run as an
unprivileged user (the `postgres` account when the tests run as root) in a temporary
directory, on a high loopback port; stopped and removed afterwards."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.servers import IS_ROOT, LOOPBACK, free_port

USER = "tunnelwatch"


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        pytest.skip(f"{name} is not installed (run the README's test command as root to install postgresql)")
    return found[-1]


@dataclass
class Postgres:
    data: Path
    port: int
    log: Path
    owner: str | None  # the account the server runs as, when the tests run as root
    fsync: bool = False  # tests do without; benchmarks measure with it

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command: Sequence[str] = [_binary(args[0]), *args[1:]]
        if self.owner:
            command = ["runuser", "-u", self.owner, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=60)

    def start(self) -> None:
        self.run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-o",
            f"-p {self.port} -k {self.data} -c listen_addresses={LOOPBACK} -c fsync={'on' if self.fsync else 'off'}",
            "start",
        )

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@{LOOPBACK}:{self.port}/{database}"

    def database(self, name: str) -> str:
        """A new, empty database; its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextmanager
def cluster(fsync: bool = False) -> Iterator[Postgres]:
    owner = None
    if IS_ROOT:
        try:
            owner = pwd.getpwnam("postgres").pw_name
        except KeyError:
            pytest.skip("no postgres account (run the README's test command as root to install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="tw-pg-"))
    server = Postgres(root / "data", free_port(), root / "server.log", owner, fsync)
    if owner:
        entry = pwd.getpwnam(owner)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    try:
        server.run("initdb", "-D", str(server.data), "-U", USER, "--auth=trust", "--no-sync", "-E", "UTF8")
        with (server.data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 127.0.0.0/8 trust\n")  # clients bound to other loopback addresses
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
