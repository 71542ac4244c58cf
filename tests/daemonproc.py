"""`tunnelwatch run` as a real subprocess, for the tests that start the daemon."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from probe.config import load_config
from tests.conftest import rows

TUNNELWATCH = [sys.executable, "-m", "probe"]


def fast(config_file: Path, extra: str = "") -> Path:
    text = config_file.read_text().replace("[probe]", "[probe]\ninterval_s = 1")
    config_file.write_text(text + extra)
    return config_file


class Daemon:
    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.db = load_config(config).store.path
        self.log = config.with_suffix(f".{time.monotonic_ns()}.log")
        with self.log.open("w") as sink:
            self.proc = subprocess.Popen(
                [*TUNNELWATCH, "run", "--config", str(config)],
                stderr=sink,
                env={**os.environ, **(env or {})},
            )

    def heartbeats(self) -> list[sqlite3.Row]:
        try:
            return rows(self.db, "heartbeats") if self.db.exists() else []
        except sqlite3.OperationalError:  # the schema is still being created
            return []

    def wait_until(self, condition: Callable[[], bool], timeout_s: float = 30, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode}: {self.output()}"
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what or condition}: {self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def scrape(config: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{load_config(config).metrics.listen}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
