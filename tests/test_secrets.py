"""A central store's password never reaches output or logs: a URL libpq would misread (its
parse errors quote the password) is refused at load, naming the key and masking the value,
and every message a driver builds about the URL is masked."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe.config import PathSpec
from probe.errors import StoreError
from probe.fleet.forwarder import Forwarder
from probe.fleet.uplink import Uplink
from probe.logs import TEXT_FORMAT, JSONFormatter, TextFormatter
from probe.pgurl import mask, redact
from probe.store.central import CentralStore
from probe.store.sqlite import SQLiteStore
from tests.servers import LOOPBACK, free_port

TUNNELWATCH = [sys.executable, "-m", "probe"]
# Two distinctive halves around the character libpq chokes on: libpq quotes the whole
# password ("invalid percent-encoded token", "unexpected spaces") or the part after an @.
SECRET_PARTS = ("Quokka", "Wombat")
PASSWORDS = {"percent": "Quokka%zzWombat", "space": "Quokka Wombat", "at": "Quokka@Wombat"}


def leaked(text: str) -> bool:
    return any(part in text for part in SECRET_PARTS)


def fleet_config(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "fleet.toml"
    config.write_text(
        f'[vantage]\nname = "v"\n[store]\npath = "{tmp_path / "spool.db"}"\nurl = "{url}"\nforward_every_s = 0.2\n'
        "[metrics]\nenabled = false\n[report]\nweekly = false\n"
        f'[[targets]]\nname = "t"\ngroup = "control"\nkind = "tcp"\nhost = "{LOOPBACK}"\nport = {free_port()}\n'
        '[[paths]]\nname = "direct"\nkind = "direct"\n'
    )
    return config


def bad_url(password: str) -> str:
    return f"postgresql://tw:{password}@{LOOPBACK}:{free_port()}/tw"


@pytest.mark.parametrize("password", PASSWORDS.values(), ids=PASSWORDS.keys())
@pytest.mark.parametrize("command", [("config", "check"), ("run",)], ids=" ".join)
def test_a_url_libpq_would_misread_is_refused_without_its_password(
    tmp_path: Path, password: str, command: tuple[str, ...]
) -> None:
    config = fleet_config(tmp_path, bad_url(password))
    result = subprocess.run(
        [*TUNNELWATCH, *command, "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "store.url" in result.stderr and "percent-encode" in result.stderr and "tw:***@" in result.stderr
    assert not leaked(result.stdout + result.stderr), result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("password", PASSWORDS.values(), ids=PASSWORDS.keys())
@pytest.mark.parametrize("command", [("outages",), ("store", "retire", "--keep-months", "3")], ids=" ".join)
def test_a_store_url_given_on_the_command_line_is_masked(
    tmp_path: Path, password: str, command: tuple[str, ...]
) -> None:
    config = fleet_config(tmp_path, f"postgresql://tw@{LOOPBACK}:{free_port()}/tw")
    result = subprocess.run(
        [*TUNNELWATCH, *command, "--config", str(config), "--store", bad_url(password)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "--store" in result.stderr and "tw:***@" in result.stderr
    assert not leaked(result.stdout + result.stderr), result.stdout + result.stderr


@pytest.mark.parametrize("password", PASSWORDS.values(), ids=PASSWORDS.keys())
def test_the_drivers_messages_are_masked(tmp_path: Path, password: str) -> None:
    """Past the config (a URL built in code): the forwarder's, the central store's and the
    uplink's errors say what is wrong with the URL and quote nothing of the password."""
    url = bad_url(password)
    SQLiteStore(tmp_path / "spool.db").close()
    forwarder = Forwarder(tmp_path / "spool.db", url, "v", batch=10, max_backlog=100)
    messages = []
    for attempt in (
        forwarder.forward,
        lambda: CentralStore(url),
        lambda: Uplink(url, PathSpec(name="direct", kind="direct")),
    ):
        with pytest.raises(StoreError) as caught:
            attempt()
        messages.append(str(caught.value))
    forwarder.close()
    assert all("percent-encode" in m and "tw:***@" in m for m in messages), messages
    assert not leaked(" ".join(messages)), messages


@pytest.fixture
def running() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("log_json", [False, True], ids=["text", "json"])
def test_a_daemon_that_cannot_reach_the_central_store_logs_no_password(
    tmp_path: Path, running: list[subprocess.Popen[str]], log_json: bool
) -> None:
    """A password holding %, a space and an @, percent-encoded as it must be: the daemon
    runs, fails to upload (nothing listens on the port) and logs that, without it."""
    config = fleet_config(tmp_path, bad_url("Quokka%25%20%40Wombat"))
    log = tmp_path / "daemon.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [*TUNNELWATCH, "run", "--config", str(config), *(["--log-json"] if log_json else [])],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    running.append(proc)
    deadline = time.monotonic() + 60
    while "measurements stay in the spool" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    proc.terminate()
    assert proc.wait(30) == 0
    output = log.read_text()
    assert "cannot open the central store" in output and "tw:***@" in output
    assert not leaked(output), output
    if log_json:
        assert all(json.loads(line) for line in output.splitlines())


def test_logs_scrub_a_password_a_library_put_in_a_message() -> None:
    """The net under the masking: a URL's or a conninfo's password in a message or a
    traceback, in text and in JSON lines."""
    try:
        raise RuntimeError("connect failed for host=db password=QuokkaWombat port=5432")
    except RuntimeError:
        record = logging.LogRecord(
            "t",
            logging.ERROR,
            __file__,
            1,
            "upload to %s failed",
            ("postgresql://tw:Quokka@Wombat@db/tw",),
            sys.exc_info(),
        )
    text = TextFormatter(TEXT_FORMAT).format(record)
    entry = json.loads(JSONFormatter().format(record))
    for shown in (text, entry["message"] + entry["exception"]):
        assert "postgresql://tw:***@db/tw" in shown and "password=***" in shown
        assert not leaked(shown), shown


def test_redact_and_mask() -> None:
    assert redact("postgresql://tw:hunter2@db:5432/tw") == "postgresql://tw:***@db:5432/tw"
    assert redact("postgresql://tw:a@b@db/tw") == "postgresql://tw:***@db/tw"
    assert (
        redact("postgresql://tw@db/tw?sslmode=require&password=hunter2")
        == "postgresql://tw@db/tw?sslmode=require&password=***"
    )
    url = "postgresql://tw:hun%25ter@db/tw"
    assert mask(f"auth failed for hun%ter ({url})", url) == "auth failed for *** (postgresql://tw:***@db/tw)"
