"""config/tunnelwatch.rules.yml: valid for Prometheus, over metrics the daemon exports, and
unit-tested by promtool against series that fire each alert and near misses that must not."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from probe.daemon.metrics import METRICS
from tests.servers import need

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "tunnelwatch.rules.yml"
UNIT_TESTS = ROOT / "tests" / "prometheus" / "tunnelwatch.rules.test.yml"
PROMETHEUS_OWN: dict[str, set[str]] = {"up": set()}  # the scrape's own series, labelled job and instance only
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
# PromQL's words that look like names: functions (followed by a parenthesis) are dropped apart.
KEYWORDS = {"and", "or", "unless", "offset", "bool"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\b([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
NAME = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
TEMPLATE_QUERY = re.compile(r"`([^`]*)`")  # the queries of annotation templates: printf `...`


def exported() -> dict[str, set[str]]:
    """Every series name the daemon exposes, with its labels (a counter's with `_total`)."""
    out: dict[str, set[str]] = {}
    for kind, name, _, labels in METRICS.values():
        names = set(labels.split())
        if kind.__name__ == "Counter":
            out[f"{name}_total"] = names
        elif kind.__name__ == "Histogram":
            out.update({f"{name}_bucket": names | {"le"}, f"{name}_sum": names, f"{name}_count": names})
        else:
            out[name] = names
    return out


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def queries(rule: dict[str, Any]) -> list[str]:
    """The rule's expression and the queries its annotations run."""
    return [rule["expr"], *(q for text in rule["annotations"].values() for q in TEMPLATE_QUERY.findall(text))]


def uses(query: str) -> tuple[dict[str, set[str]], set[str]]:
    """The metric names a PromQL query reads, each with the labels its matchers name, and the
    labels it groups or matches on."""
    grouping = {label.strip() for labels in GROUPING.findall(query) for label in labels.split(",") if label.strip()}
    bare = GROUPING.sub(" ", query)
    selected: dict[str, set[str]] = {}
    for name, matchers in SELECTOR.findall(bare):
        selected.setdefault(name, set()).update(MATCHER_LABEL.findall(re.sub(r'"[^"]*"', '""', matchers)))
    bare = SELECTOR.sub(lambda m: f" {m.group(1)} ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)  # range and subquery durations
    for name in NAME.findall(bare):
        if name not in KEYWORDS:
            selected.setdefault(name, set())
    return selected, grouping


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_rule_waits_has_a_severity_and_reads_on_a_phone() -> None:
    for rule in rules():
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{rule['alert']}: no `for:`"
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
        fixed = re.sub(r"\{\{.*?\}\}", "", summary)  # the words around the names filled in
        assert 0 < len(fixed) <= 50 and "\n" not in summary, f"{rule['alert']}: summary {summary!r}"
        assert len(description) > len(summary), f"{rule['alert']}: no description"


def header() -> dict[str, set[str]]:
    """The metrics the comment at the top of the rules file says each alert uses."""
    said: dict[str, set[str]] = {}
    alert = ""
    for line in RULES.read_text().split("\ngroups:")[0].splitlines():
        if m := re.match(r"#\s+(Tunnelwatch\w+)\s+(.*)", line):
            alert, line = m.groups()
        elif not re.match(r"#\s{20,}\S", line):
            alert = ""
        if alert:
            said.setdefault(alert, set()).update(re.findall(r"\b(?:probe|tunnelwatch)_\w+|\bup\b", line))
    return said


def test_every_metric_the_rules_read_is_one_the_daemon_exports_with_those_labels() -> None:
    known = exported() | PROMETHEUS_OWN
    said = header()
    for rule in rules():
        read: dict[str, set[str]] = {}
        grouped: set[str] = set()
        for query in queries(rule):
            selected, grouping = uses(query)
            for name, labels in selected.items():
                read.setdefault(name, set()).update(labels)
            grouped |= grouping
        assert read, f"{rule['alert']} reads no metric"
        for name, labels in read.items():
            assert name in known, f"{rule['alert']} reads {name}, which the daemon does not export"
            assert labels <= known[name] | TARGET_LABELS, f"{rule['alert']}: {name} has no label {labels - known[name]}"
        assert grouped <= set().union(*(known[n] for n in read)) | TARGET_LABELS, f"{rule['alert']} groups by {grouped}"
        assert said.get(rule["alert"]) == set(read), f"the header's list for {rule['alert']} is not what it reads"
    assert set(said) == {rule["alert"] for rule in rules()}


def test_the_metric_check_sees_a_misspelt_metric_and_label() -> None:
    assert uses('max by (job, path) (probe_succes{group="control"}) == 0')[0] == {"probe_succes": {"group"}}
    selected, grouping = uses('increase(tunnelwatch_rounds_total{grup="a"}[15m]) > 0 unless up offset 5m')
    assert selected == {"tunnelwatch_rounds_total": {"grup"}, "up": set()}
    assert "tunnelwatch_rounds_total" in exported() and "grup" not in exported()["tunnelwatch_rounds_total"]


def test_every_alert_has_a_case_that_fires_it_and_one_that_must_not() -> None:
    cases = yaml.safe_load(UNIT_TESTS.read_text())
    assert cases["rule_files"] == ["../../config/tunnelwatch.rules.yml"]
    checks = [check for test in cases["tests"] for check in test["alert_rule_test"]]
    for rule in rules():
        mine = [check for check in checks if check["alertname"] == rule["alert"]]
        assert any(check["exp_alerts"] for check in mine), f"nothing fires {rule['alert']}"
        assert any(not check["exp_alerts"] for check in mine), f"no near miss for {rule['alert']}"


# One way to break each rule that its unit tests must notice: a shorter `for:` lets a blip
# through, a missing matcher or condition catches a near miss.
BREAKAGES = {
    "TunnelwatchLocalOutage": ('probe_success{group="control"}) == 0', "probe_success) == 0"),
    "TunnelwatchTunnelDown": ("for: 10m", "for: 5m"),
    "TunnelwatchPathFailsAllControls": ("max by (job, instance, path)", "min by (job, instance, path)"),
    "TunnelwatchStoreWritesFailing": ("tunnelwatch_store_buffered_measurements > 0", "vector(1)"),
    "TunnelwatchStoreNotWriting": ("min_over_time(tunnelwatch_store_buffered_measurements[15m])", "tunnelwatch_store_buffered_measurements"),
    "TunnelwatchStoreDroppedMeasurements": ("increase(tunnelwatch_store_dropped_measurements_total[30m])", "tunnelwatch_store_dropped_measurements_total"),
    "TunnelwatchStoreReplaced": ("for: 5m", "for: 40m"),
    "TunnelwatchProbingStalled": ("sum by (job, instance) (increase(tunnelwatch_rounds_total[15m]))", "increase(tunnelwatch_rounds_total[15m])"),
    "TunnelwatchRoundsSkipped": ("for: 30m", "for: 10m"),
    "TunnelwatchDaemonDown": ('up{job="tunnelwatch"}', "up"),
    "TunnelwatchForwardingFailing": ("tunnelwatch_forward_backlog_age_seconds > 900\n          and", "tunnelwatch_forward_backlog_age_seconds > 0\n          and"),
    "TunnelwatchForwardingBehind": ("unless", "and"),
    "TunnelwatchForwardDroppedMeasurements": ("> max_over_time(tunnelwatch_forward_dropped_measurements[1h] offset 5m)", "> 0"),
}  # fmt: skip


def test_every_rule_has_a_breakage_to_try() -> None:
    assert set(BREAKAGES) == {rule["alert"] for rule in rules()}


@pytest.mark.parametrize("alert", sorted(BREAKAGES))
def test_the_unit_tests_catch_a_broken_rule(alert: str, tmp_path: Path) -> None:
    text = RULES.read_text()
    start = text.index(f"- alert: {alert}\n")
    end = text.find("- alert:", start + 1) if "- alert:" in text[start + 1 :] else len(text)
    old, new = BREAKAGES[alert]
    assert text.count(old, start, end) >= 1, f"{alert} no longer has {old!r}: update BREAKAGES"
    broken = text[:start] + text[start:end].replace(old, new, 1) + text[end:]
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / RULES.name).write_text(broken)
    (tmp_path / "tests" / "prometheus").mkdir(parents=True)
    (tmp_path / "tests" / "prometheus" / UNIT_TESTS.name).write_text(UNIT_TESTS.read_text())
    assert promtool("check", "rules", str(tmp_path / "config" / RULES.name)).returncode == 0, "the breakage is valid"
    result = promtool("test", "rules", str(tmp_path / "tests" / "prometheus" / UNIT_TESTS.name))
    assert result.returncode != 0, f"the unit tests pass with {alert} broken ({old!r} -> {new!r})"
    assert f"alertname: {alert}," in result.stdout + result.stderr, result.stdout + result.stderr
