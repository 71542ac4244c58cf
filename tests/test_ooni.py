"""OONI interoperability: real OONI measurements imported, our measurements exported in OONI's
format (and as CSV and Parquet) and read back, as a user runs `tunnelwatch import ooni` and
`tunnelwatch export`."""

from __future__ import annotations

import gzip
import json
import re
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from analysis.frames import Source
from analysis.ooni.export import windows
from analysis.ooni.importer import import_files
from probe.store.schema import MEASUREMENT_COLUMNS
from tests.analysis_data import analysis_config, realistic_week
from tests.servers import shared_data

TUNNELWATCH = [sys.executable, "-m", "probe"]
OONI = shared_data() / "ooni"
# The base data format's keys (ooni/spec data-formats/df-000-base.md) a client writes.
BASE_KEYS = {
    "annotations",
    "data_format_version",
    "input",
    "measurement_start_time",
    "probe_asn",
    "probe_cc",
    "probe_ip",
    "report_id",
    "software_name",
    "software_version",
    "test_keys",
    "test_name",
    "test_runtime",
    "test_start_time",
    "test_version",
}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUNNELWATCH, *args], capture_output=True, text=True, timeout=300)


def rows(db: Path, where: str = "1 = 1", args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        query = f"SELECT {', '.join(MEASUREMENT_COLUMNS)} FROM measurements WHERE {where} ORDER BY started_at_ms, round_id, target, path"
        return [dict(r) for r in conn.execute(query, args)]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("ooni") / "ooni.db"
    result = cli("import", "ooni", str(OONI), "--store", str(db))
    assert result.returncode == 0, result.stderr
    assert "imported 11 measurements (13 rows) from 11 files" in result.stderr
    return db


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A week of a lab vantage point in Beijing (tests/analysis_data.py) and its config."""
    tmp = tmp_path_factory.mktemp("lab")
    realistic_week(tmp / "lab.db")
    config = analysis_config(tmp, tmp / "lab.db")
    text = config.read_text().replace('name = "beijing-lab"', 'name = "lab"\nlabels = { cc = "CN", asn = "AS4134" }')
    config.write_text(text)
    return config


def test_real_measurements_import_with_vantage_target_failure_and_oonis_verdict(imported: Path) -> None:
    (web,) = rows(imported, "vantage = ?", ("ooni-cn-as4134",))  # 2017, China Telecom: DNS blocking
    assert (web["target"], web["path"], web["kind"], web["input"]) == (
        "http://www.efindlove.com",
        "direct",
        "http",
        "http://www.efindlove.com",
    )
    assert (web["ok"], web["failure"], web["failed_operation"]) == (0, "http_invalid_redirect_url", "http_round_trip")
    assert json.loads(web["addresses"]) == ["61.183.1.186"]
    verdict = json.loads(web["detail"])["ooni"]
    assert (verdict["blocking"], verdict["accessible"], verdict["dns_consistency"]) == ("dns", False, "inconsistent")
    assert verdict["measurement_uid"] == "01201705167c104b698173927d63aadf48fb2fa1"

    (tor,) = rows(imported, "vantage = ?", ("ooni-cn-as17623",))  # 2022: the bootstrap stuck at 5 %
    assert (tor["target"], tor["path"], tor["ok"]) == ("vanilla_tor", "tor", 0)
    assert (tor["failure"], tor["failed_operation"]) == ("generic_timeout_error", "tunnel_bootstrap")
    kept = json.loads(tor["detail"])["ooni"]
    assert (kept["success"], kept["tor_progress"], kept["tor_progress_tag"]) == (False, 5, "conn")

    (good,) = rows(imported, "vantage = ?", ("ooni-br-as8167",))
    assert (good["ok"], good["failure"], good["proxy_ms"]) == (1, None, pytest.approx(87502.184))

    (vpn,) = rows(imported, "vantage = ?", ("ooni-ro-as9009",))
    assert (vpn["path"], vpn["ok"], vpn["peer_address"]) == ("openvpn", 1, "198.252.153.109")
    assert json.loads(vpn["detail"])["ooni"]["success"] is True

    (riseup,) = rows(imported, "vantage = ?", ("ooni-af-as135376",))
    assert (riseup["path"], riseup["ok"], riseup["failure"]) == ("riseupvpn", 0, "ssl_invalid_certificate")
    assert riseup["failed_operation"] == "tls_handshake"
    assert riseup["cert_subject"] == "CN=black.riseup.net"
    assert json.loads(riseup["detail"])["ooni"]["api_status"] == "blocked"

    relays = rows(imported, "vantage = ? AND path = 'tor'", ("ooni-it-as30722",))  # the tor experiment's targets
    assert sorted((r["kind"], r["input"], r["ok"]) for r in relays) == [
        ("http", "66.111.2.131:9030", 1),
        ("tcp", "38.229.1.78:80", 1),
        ("tls", "66.111.2.131:9001", 1),
    ]
    (snowflake,) = rows(imported, "path = 'tor-snowflake'")
    assert (snowflake["ok"], snowflake["failure"]) == (0, "generic_timeout_error")

    paths = sqlite3.connect(imported).execute("SELECT name, kind, label FROM paths ORDER BY name").fetchall()
    assert paths == [
        ("direct", "direct", ""),
        ("openvpn", "ooni", "openvpn"),
        ("riseupvpn", "ooni", "openvpn"),
        ("tor", "ooni", "tor"),
        ("tor-snowflake", "ooni", "snowflake"),
    ]


def test_importing_twice_stores_once(imported: Path) -> None:
    before = rows(imported)
    again = cli("import", "ooni", str(OONI), "--store", str(imported))
    assert again.returncode == 0, again.stderr
    assert "imported 0 measurements" in again.stderr and "11 were there already" in again.stderr
    assert rows(imported) == before
    beats = sqlite3.connect(imported).execute("SELECT COUNT(*) FROM heartbeats").fetchone()[0]
    assert beats == 11


def test_malformed_lines_are_reported_and_the_rest_imported(tmp_path: Path) -> None:
    good = json.loads((OONI / "vanilla_tor.json").read_text())
    other = dict(good, report_id="another-report", measurement_start_time="2022-08-03 21:55:29")
    lines = [
        '{"test_name": "vanilla_tor", }',
        json.dumps(good),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"test_name": "vanilla_tor"}),
        json.dumps(dict(good, test_name="ndt", report_id="x")),
        json.dumps(dict(good, measurement_start_time="yesterday", report_id="y")),
        "",
        json.dumps(other),
    ]
    path = tmp_path / "batch.jsonl.gz"
    with gzip.open(path, "wt") as out:
        out.write("\n".join(lines) + "\n")
    (tmp_path / "empty.json").write_text("")
    db = tmp_path / "store.db"
    result = cli("import", "ooni", str(path), str(tmp_path / "empty.json"), "--store", str(db))
    assert result.returncode == 2
    assert f"{path}:1: not JSON" in result.stderr and f"{path}:3: not JSON" in result.stderr
    assert f"{path}:4: a JSON list, not a measurement object" in result.stderr
    assert (
        f"{path}:5: not an OONI measurement: no measurement_start_time, probe_cc, probe_asn, test_keys" in result.stderr
    )
    assert f"{path}:7: measurement_start_time 'yesterday'" in result.stderr
    assert "skipped 1 of tests not read: ndt (1)" in result.stderr
    assert "imported 2 measurements" in result.stderr
    assert [r["started_at_ms"] for r in rows(db)] == [1659477329000, 1659563729000]


def test_export_then_import_gives_the_same_measurements(lab: Path, tmp_path: Path) -> None:
    out = tmp_path / "lab.jsonl.gz"
    exported = cli("export", "--config", str(lab), "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    back = tmp_path / "back.db"
    result = import_files([out], back)
    assert result.problems == [] and result.duplicates == 0
    source = rows(Path(re.search(r'path = "(.+)"', lab.read_text()).group(1)))  # type: ignore[union-attr]
    assert len(source) == (7 * 24 - 6) * 12 * 13  # 13 probes a slot, a week but the 6 h the daemon was stopped
    assert rows(back) == source
    paths = sqlite3.connect(back).execute("SELECT * FROM paths ORDER BY name").fetchall()
    assert paths == [
        ("direct", "direct", "", None),
        ("vpn", "socks5", "shadowsocks", "vpn-endpoint"),
        ("wg", "bind", "wireguard", None),
    ]


def _types(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def test_exported_measurements_have_oonis_keys_and_types(lab: Path, tmp_path: Path) -> None:
    out = tmp_path / "week.jsonl"
    exported = cli("export", "--config", str(lab), "--out", str(out), "--since", "2018-03-06", "--until", "2018-03-07")
    assert exported.returncode == 0, exported.stderr
    measurements = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(measurements) == 24 * 12 * 13
    real = [json.loads(p.read_text()) for p in sorted(OONI.glob("*.json"))]
    for m in measurements:
        assert BASE_KEYS <= m.keys()
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", m["measurement_start_time"])
        assert "2018-03-06 00:00:00" <= m["measurement_start_time"] < "2018-03-07 00:00:00"
        assert (m["probe_cc"], m["probe_asn"], m["software_name"]) == ("CN", "AS4134", "tunnelwatch")
        assert all(isinstance(v, str) for v in m["annotations"].values())
        for other in real:  # every key a real measurement has too holds the same type there
            for key in m.keys() & other.keys() - {"input"}:
                assert type(m[key]) is type(other[key]), key
    by = {(m["annotations"]["tunnelwatch_round_id"], m["annotations"]["tunnelwatch_path"]): m for m in measurements}
    crackdown = by[("r420-news", "vpn")]["test_keys"]  # 2018-03-06 03:00 UTC: the vpn tunnel down
    assert (crackdown["failure"], crackdown["failed_operation"]) == ("eof_error", "http_round_trip")
    assert crackdown["x_verdict"]["verdict"] == "tunnel_down"
    assert crackdown["x_verdict"]["rule"] == "tunnel-fails-controls"
    assert crackdown["requests"][0]["failure"] == "eof_error"
    blocked = by[("r400-news", "direct")]["test_keys"]
    assert (blocked["failure"], blocked["failed_operation"], blocked["blocking"]) == (
        "connection_reset",
        "tls_handshake",
        "tls",
    )
    assert blocked["accessible"] is False and blocked["x_verdict"]["rule"] == "blocked-tls"
    fine = by[("r400-portal", "wg")]
    keys = fine["test_keys"]
    assert fine["input"] == "https://portal.example/" and keys["failure"] is None and keys["accessible"] is True
    assert [a["ipv4"] for a in keys["queries"][0]["answers"]] == ["93.184.216.34"]
    assert keys["requests"][0]["response"]["code"] == 200
    connect = keys["tcp_connect"][0]
    assert connect["t"] - connect["t0"] == pytest.approx(keys["x_tunnelwatch"]["connect_ms"] / 1000)
    ids = {m["report_id"] for m in measurements if m["annotations"]["tunnelwatch_round_id"] == "r400-news"}
    assert len(ids) == 1 and re.fullmatch(r"20180306T0120\d\dZ_urlgetter_CN_4134_n1_[0-9a-f]{16}", ids.pop())


def test_csv_and_parquet_hold_the_rows_and_their_verdicts(lab: Path, tmp_path: Path) -> None:
    for fmt in ("parquet", "csv"):
        out = tmp_path / f"week.{fmt}"
        result = cli("export", "--config", str(lab), "--format", fmt, "--out", str(out), "--path", "vpn")
        assert result.returncode == 0, result.stderr
        frame = pd.read_parquet(out) if fmt == "parquet" else pd.read_csv(out)
        assert len(frame) == (7 * 24 - 6) * 12 * 4 and set(frame["path"]) == {"vpn"}
        crackdown = frame[frame["verdict"] == "tunnel_down"]
        assert len(crackdown) == 16 * 12 * 4 and set(crackdown["rule"]) == {"tunnel-fails-controls"}
        assert (crackdown["failure"] == "eof_error").mean() > 0.95  # and the 1 % noise of the week's data
    assert str(pd.read_parquet(out.with_suffix(".parquet"))["started_at"].dtype) == "datetime64[ms, UTC]"
    refused = cli("export", "--config", str(lab), "--format", "parquet")
    assert refused.returncode == 2 and "--out" in refused.stderr


def test_windows_judge_as_one_read_of_everything(lab: Path) -> None:
    """Reading a window at a time gives every row the verdict one read of the whole week gives."""
    db = Path(re.search(r'path = "(.+)"', lab.read_text()).group(1))  # type: ignore[union-attr]
    small = pd.concat(windows(Source(db), None, None, 300, window=pd.Timedelta(minutes=20)))
    whole = pd.concat(windows(Source(db), None, None, 300, window=pd.Timedelta(days=30)))
    columns = ["round_id", "target", "path", "verdict", "rule"]
    key = ["round_id", "target", "path"]
    assert len(small) == len(whole) == len(rows(db))
    pd.testing.assert_frame_equal(
        small[columns].sort_values(key).reset_index(drop=True), whole[columns].sort_values(key).reset_index(drop=True)
    )


def test_outages_of_an_imported_ooni_series(tmp_path: Path) -> None:
    """A month of hourly vanilla_tor measurements from China with the bootstrap failing 3-5 March."""
    template = json.loads((OONI / "vanilla_tor.json").read_text())
    start = datetime(2018, 3, 1, tzinfo=UTC)
    lines = []
    for hour in range(30 * 24):
        at = start + timedelta(hours=hour)
        failing = datetime(2018, 3, 3, tzinfo=UTC) <= at < datetime(2018, 3, 6, tzinfo=UTC)
        keys = dict(template["test_keys"], success=not failing, failure="generic_timeout_error" if failing else None)
        keys["bootstrap_time"] = 0 if failing else 30.5
        lines.append(
            json.dumps(
                dict(
                    template,
                    probe_asn="AS4134",
                    measurement_start_time=f"{at:%Y-%m-%d %H:%M:%S}",
                    report_id=f"{at:%Y%m%dT%H%M%SZ}_vanillator_CN_4134_n1_test",
                    test_keys=keys,
                )
            )
        )
    (tmp_path / "month.jsonl").write_text("\n".join(lines) + "\n")
    db = tmp_path / "ooni.db"
    assert import_files([tmp_path / "month.jsonl"], db).measurements == 30 * 24
    config = analysis_config(tmp_path, db, "[probe]\ninterval_s = 3600")
    result = cli(
        "outages", "--config", str(config), "--store", str(db), "--vantage", "ooni-cn-as4134", "--format", "json"
    )
    assert result.returncode == 0, result.stderr
    (outage,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert (outage["path"], outage["targets"], outage["start"]) == ("tor", ["vanilla_tor"], "2018-03-03T00:00:00+00:00")
    assert outage["end"] == "2018-03-06T00:00:00+00:00" and outage["verdict"] == "tunnel_down"  # never came up


def test_oonis_daily_aggregate_csv_is_a_series(tmp_path: Path) -> None:
    """The CSV OONI's aggregation API gives per day (axis_x=measurement_start_day), read as
    --series reads a series: a jump in anomalies 5-9 June 2019 is found without the dates."""
    days = pd.date_range("2019-01-01", "2019-09-30", freq="D")
    counts = []
    for i, day in enumerate(days):
        measured = 1000 + (i * 37) % 90
        anomalies = 40 + (i * 13) % 11 + (400 if pd.Timestamp("2019-06-05") <= day <= pd.Timestamp("2019-06-09") else 0)
        counts.append((day.date().isoformat(), anomalies, 3, 20 + i % 5, measured - anomalies - 3, measured))
    frame = pd.DataFrame(
        counts,
        columns=[
            "measurement_start_day",
            "anomaly_count",
            "confirmed_count",
            "failure_count",
            "ok_count",
            "measurement_count",
        ],
    )
    frame.to_csv(tmp_path / "aggregation.csv", index=False)
    result = cli(
        "events",
        "detect",
        "--series",
        str(tmp_path / "aggregation.csv"),
        "--column",
        "anomaly_count",
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    signals = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(s["start"], s["kind"]) for s in signals] == [("2019-06-05", "above")]


def test_psiphon_as_its_spec_describes_it(tmp_path: Path) -> None:
    """No real psiphon measurement is in the shared data: ts-015-psiphon's conclusions table."""
    base = json.loads((OONI / "vanilla_tor.json").read_text())
    cases = {  # bootstrap_time, failure -> ok, failed_operation
        "2021-05-01 10:00:00": (0, "generic_timeout_error", 0, "tunnel_bootstrap"),  # error in bootstrapping
        "2021-05-01 11:00:00": (6.1, "connection_reset", 0, None),  # error in using Psiphon
        "2021-05-01 12:00:00": (6.1, None, 1, None),  # working
    }
    lines = [
        json.dumps(
            dict(
                base,
                test_name="psiphon",
                report_id=f"psiphon-{when}",
                measurement_start_time=when,
                test_keys={"bootstrap_time": seconds, "failure": failure, "max_runtime": 60},
            )
        )
        for when, (seconds, failure, _, _) in cases.items()
    ]
    (tmp_path / "psiphon.jsonl").write_text("\n".join(lines))
    db = tmp_path / "store.db"
    assert import_files([tmp_path / "psiphon.jsonl"], db).measurements == 3
    stored = rows(db)
    assert [(r["target"], r["path"], r["grp"]) for r in stored] == [("psiphon", "psiphon", "psiphon")] * 3
    assert [(r["ok"], r["failure"], r["failed_operation"]) for r in stored] == [
        (ok, failure, operation) for _, failure, ok, operation in cases.values()
    ]
    assert [r["proxy_ms"] for r in stored] == [None, 6100.0, 6100.0]


def test_imported_measurements_export_where_they_were_measured(imported: Path) -> None:
    result = cli("export", "--store", str(imported), "--vantage", "ooni-cn-as17623")
    assert result.returncode == 0, result.stderr
    (m,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert (m["probe_cc"], m["probe_asn"], m["measurement_start_time"]) == ("CN", "AS17623", "2022-08-02 21:55:29")
    assert (m["test_keys"]["failure"], m["test_keys"]["failed_operation"]) == (
        "generic_timeout_error",
        "tunnel_bootstrap",
    )
    assert m["annotations"]["tunnelwatch_path"] == "tor" and m["annotations"]["tunnelwatch_tunnel"] == "tor"
    # the tunnel never came up: its own step failed, whatever the other paths saw
    assert (m["test_keys"]["x_verdict"]["verdict"], m["test_keys"]["x_verdict"]["rule"]) == (
        "tunnel_down",
        "tunnel-own-step",
    )
