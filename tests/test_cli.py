"""`tunnelwatch probe`, `run`, `status` and `config check` as a user runs them, against loopback
servers; what each command loads before it starts."""

from __future__ import annotations

import io
import json
import random
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest
from rich.console import Console
from rich.table import Table
from rich.text import Text

from analysis.cli import events_group
from probe.cli import app
from probe.config import default_config_path, load_config
from probe.console import LazyGroup
from probe.store.latest import latest
from probe.tables import Cell, table
from tests.analysis_data import analysis_config, build_store, everything, fail
from tests.conftest import DNS, PAGE_TITLE, rows
from tests.servers import LOOPBACK

TUNNELWATCH = [sys.executable, "-m", "probe"]


def test_probe_stores_a_row_for_every_pair_and_a_heartbeat(config_file: Path) -> None:
    result = subprocess.run([*TUNNELWATCH, "probe", "--config", str(config_file)], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr  # "down" failed
    db = load_config(config_file).store.path
    stored = {(r["target"], r["path"]): r for r in rows(db)}
    assert set(stored) == {
        ("page", "direct"), ("page", "shadowsocks"), ("control-page", "direct"),
        ("control-page", "shadowsocks"), ("down", "direct"), ("down", "shadowsocks"),
        ("shadowsocks-endpoint", "direct"),
    }  # fmt: skip
    assert stored["page", "shadowsocks"]["ok"] == 1 and stored["page", "shadowsocks"]["title"] == PAGE_TITLE
    assert stored["shadowsocks-endpoint", "direct"]["ok"] == 1
    assert stored["shadowsocks-endpoint", "direct"]["grp"] == "endpoint"
    assert stored["down", "direct"]["failure"] == "connection_refused"
    # ss-local acknowledges a SOCKS CONNECT before its server has connected, so a bare TCP
    # probe through Shadowsocks cannot see the refused port: only a probe that sends data can.
    assert stored["down", "shadowsocks"]["ok"] == 1
    (beat,) = rows(db, "heartbeats")
    assert (beat["probes"], beat["succeeded"]) == (7, 6)
    for target in ("page", "control-page", "down"):  # the paths of one target are probed together
        starts = [r["started_at_ms"] for (t, _), r in stored.items() if t == target]
        assert max(starts) - min(starts) < 2000
    assert {r["round_id"] for r in stored.values()} == {beat["round_id"]}
    assert "page" in result.stdout and "connection_refused" in result.stdout


def test_probe_exits_0_when_all_succeed_and_prints_json(config_file: Path) -> None:
    result = subprocess.run(
        [*TUNNELWATCH, "probe", "--config", str(config_file), "-t", "page", "-p", "direct", "--json", "--no-store"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    record = json.loads(line)
    assert (record["target"], record["path"], record["ok"], record["title"]) == ("page", "direct", True, PAGE_TITLE)
    assert not load_config(config_file).store.path.exists()


def test_unknown_target_name_is_refused_with_the_valid_ones(config_file: Path) -> None:
    result = subprocess.run(
        [*TUNNELWATCH, "probe", "--config", str(config_file), "-t", "nope"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "'nope'" in result.stderr and "page, control-page, down" in result.stderr


def test_shipped_default_config_stores_a_specific_failure_for_every_pair(tmp_path: Path, dns: DNS) -> None:
    """The shipped config as it is, but with its resolver on loopback so no query leaves this
    machine: that resolver refuses everything, as a resolver cut off from the Internet would."""
    text = default_config_path().read_text()
    text = text.replace('resolver = "system"', f'resolver = ["{LOOPBACK}:{dns.refused_port}"]')
    config = tmp_path / "default.toml"
    config.write_text(text)
    result = subprocess.run(
        [*TUNNELWATCH, "probe", "--config", str(config)], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 1, result.stderr
    stored = rows(tmp_path / "data" / "tunnelwatch.db")
    assert len(stored) == 10
    assert {r["failure"] for r in stored} == {"dns_refused_error"}
    assert {r["failed_operation"] for r in stored} == {"resolve"}


# Runs tunnelwatch with ARGV[2:] and writes the names of the modules it had loaded at exit to ARGV[1].
LOADED = """
import atexit, json, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv[0] = "tunnelwatch"
from probe.cli import main
main()
"""
DATAFRAME_LIBRARIES = ("pandas", "matplotlib", "scipy", "statsmodels")
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def recent_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A day of 5-minute rounds up to now; "vpn" failed for news 10 hours and 2 hours ago."""
    tmp = tmp_path_factory.mktemp("recent")
    start = NOW - timedelta(days=1, minutes=1)
    failed = {24 * 12 - 120: "connection_reset", 24 * 12 - 24: "eof_error"}  # rounds 10 h and 2 h before the last
    down = {i: {("news", "vpn"): fail(failure, "http_round_trip")} for i, failure in failed.items()}
    build_store(tmp / "tw.db", [(i, everything(down.get(i, {}))) for i in range(24 * 12 + 1)], start=start)
    return analysis_config(tmp, tmp / "tw.db")


def loaded(tmp_path: Path, *args: str) -> set[str]:
    out = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", LOADED, str(out), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(out.read_text()))


@pytest.mark.parametrize(
    "args", [["--help"], ["config", "check"], ["events", "list"], ["status"]], ids=lambda a: " ".join(a)
)
def test_commands_without_dataframes_load_no_dataframe_library(
    tmp_path: Path, recent_store: Path, args: list[str]
) -> None:
    modules = loaded(tmp_path, *args, *([] if args == ["--help"] else ["--config", str(recent_store)]))
    assert not {m for m in modules if m.split(".")[0] in DATAFRAME_LIBRARIES}


def test_help_loads_no_command_module(tmp_path: Path) -> None:
    layers = ("analysis", "probe.daemon", "probe.measure", "probe.store", "probe.fleet", "probe.config")
    assert not {m for m in loaded(tmp_path, "--help") if m.startswith(layers)}


@pytest.mark.parametrize("group", [app, events_group], ids=["tunnelwatch", "events"])
def test_the_help_of_a_command_loaded_later_is_its_own(group: LazyGroup) -> None:
    """A lazy group lists its commands by the short help written beside each: the same, at
    any width, as the command's own docstring gives."""
    ctx = click.Context(group)
    for name, (_, short) in group.lazy.items():
        command = group.get_command(ctx, name)
        assert command is not None and command.name == name
        for width in (30, 45, 80, 1000):
            assert click.Command(name, help=short).get_short_help_str(width) == command.get_short_help_str(width)


def test_config_check_counts_in_the_singular(recent_store: Path) -> None:
    result = subprocess.run(
        [*TUNNELWATCH, "config", "check", "--config", str(recent_store)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert f"ok: {recent_store}: 1 target, 1 path" in result.stderr


def test_status_shows_the_newest_rows(recent_store: Path) -> None:
    """Each path's state from the newest measurement of each target; the pairs failing now
    or in the hours before the newest measurement with their last failure (the one 2 hours
    before, not the one 10 hours before), the others counted."""
    result = subprocess.run([*TUNNELWATCH, "status", "--config", str(recent_store)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "last heartbeat: " in result.stdout and " ago), round r288-vpn-endpoint" in result.stdout
    (vpn,) = [line for line in result.stdout.splitlines() if line.startswith("│ vpn ")]
    assert "up" in vpn and "4/4" in vpn
    (news_vpn,) = [line for line in result.stdout.splitlines() if "│ news " in line and "│ vpn " in line]
    assert "eof_error" in news_vpn and "connection_reset" not in result.stdout
    assert "targets and paths failing now or in the past 6.0 h" in result.stdout
    assert "12 other pairs: ok, no failure in the past 6.0 h" in result.stdout


def test_status_names_the_targets_it_has_no_recent_measurement_of(recent_store: Path, tmp_path: Path) -> None:
    """A target the store has no row of near the newest (new to the config, or its rounds
    stopped) is named, not silently left out."""
    config = tmp_path / "more.toml"
    config.write_text(
        recent_store.read_text() + '[[targets]]\nname = "newcomer"\ngroup = "control"\nkind = "tcp"\n'
        'host = "127.0.0.1"\nport = 9\n'
    )
    result = subprocess.run([*TUNNELWATCH, "status", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "before the newest: newcomer (new to the config" in result.stdout, result.stdout
    plain = subprocess.run([*TUNNELWATCH, "status", "--config", str(recent_store)], capture_output=True, text=True)
    assert "no measurement in the" not in plain.stdout


def test_status_reads_the_newest_rows_by_index(recent_store: Path) -> None:
    """No query of `status` scans a table: its cost does not grow with the store."""
    db = sqlite3.connect(load_config(recent_store).store.path)
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    found = latest(db, now_ms=600_000, failures_ms=6 * 3600_000)
    db.set_trace_callback(None)
    assert found.heartbeat is not None and len(found.pairs) == 13
    for statement in statements:
        plan = [row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}")]
        scans = [step for step in plan if step.split()[:2] in (["SCAN", "measurements"], ["SCAN", "heartbeats"])]
        assert not scans and not [step for step in plan if step.startswith("SCAN m")], (statement, plan)
    db.close()


# What a cell may hold: words, spaces, a tab, a new line, a bell, a CR, wide and combined
# characters, an emoji, markup and an emoji code (never read as such), nothing at all.
PIECES = ("a", "bc", "-", ".", " ", "  ", "字", "é", "\t", "\n", "\x07", "\r", "😀", "\u200d", "[red]", ":smile:", "")
HEADERS = ("target", "path", "ok", "last failure", "x")


@pytest.mark.parametrize("terminal", [False, True], ids=["file", "terminal"])
def test_tables_of_cells_draw_as_rich_draws_text(terminal: bool) -> None:
    """probe/tables.py: a table of Cells draws, byte for byte and colours included, what a
    rich Table of Text draws, for tables that fit, that wrap and that are squeezed hard."""
    choose = random.Random(14)
    for _ in range(300):
        headers = choose.choices(HEADERS, k=choose.randint(1, 7))
        title = choose.choice([None, "title", Text("events [x]")])
        cells = [
            [
                ("".join(choose.choices(PIECES, k=choose.randint(0, 8))), choose.choice(["", "green", "red"]))
                for _ in headers
            ]
            for _ in range(choose.randint(0, 10))
        ]
        width = choose.randint(5, 220)
        plain = Table(title=title)
        for name in headers:
            plain.add_column(name)
        quick = table(title, headers)
        for row in cells:
            plain.add_row(*(Text(text, style) for text, style in row))
            quick.add_row(*(Cell(text, style) for text, style in row))
        drawn = []
        for grid in (plain, quick):
            buffer = io.StringIO()
            color = "truecolor" if terminal else None
            Console(file=buffer, width=width, force_terminal=terminal, color_system=color).print(grid)
            drawn.append(buffer.getvalue())
        assert drawn[0] == drawn[1], (width, title, headers, cells)
