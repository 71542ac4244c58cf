"""`tunnelwatch probe` and `tunnelwatch run` as a user runs them, against loopback servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from probe.config import default_config_path, load_config
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
