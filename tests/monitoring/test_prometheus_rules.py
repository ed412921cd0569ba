"""Prometheus config and rules load, and every alert is tested both ways and documented."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring.tools import (
    ALERTS,
    PROMETHEUS,
    README,
    RULE_TESTS_DIR,
    RULES_DIR,
    alerting_rules,
    load_yaml,
    rule_files,
    rule_test_files,
    run,
    tool,
)


def test_prometheus_config_is_valid() -> None:
    result = run([tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rule_files())} rule files found" in result.stdout + result.stderr


def test_rule_files_are_valid_without_duplicate_rules() -> None:
    result = run([tool("promtool"), "check", "rules", "--lint-fatal", *map(str, rule_files())])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = run([tool("promtool"), "test", "rules", *map(str, rule_test_files())])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_designed_alert_exists_with_severity_and_annotations() -> None:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for rule in alerting_rules():
        by_name.setdefault(rule["alert"], []).append(rule)
    assert sorted(by_name) == sorted(ALERTS)
    for name, found in by_name.items():
        for rule in found:
            assert rule["labels"]["severity"] in ("warning", "critical"), name
            annotations = rule["annotations"]
            assert {"summary", "description", "runbook"} <= set(annotations), name
            assert annotations["runbook"] == f"monitoring/README.md#{name.lower()}"
            assert len(annotations["description"]) > 80, f"{name}: say what to look at"


def test_every_alert_has_a_firing_case_with_annotations_and_a_near_miss() -> None:
    firing: dict[str, int] = {}
    quiet: dict[str, int] = {}
    for path in rule_test_files():
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                name = check["alertname"]
                expected = check.get("exp_alerts") or []
                if not expected:
                    quiet[name] = quiet.get(name, 0) + 1
                    continue
                for alert in expected:
                    assert "severity" in alert["exp_labels"], (path.name, case["name"])
                    assert {"summary", "description", "runbook"} <= set(
                        alert.get("exp_annotations", {})
                    ), (path.name, case["name"])
                firing[name] = firing.get(name, 0) + 1
    missing_firing = [name for name in ALERTS if name not in firing]
    missing_quiet = [name for name in ALERTS if name not in quiet]
    assert not missing_firing, f"alerts without a must-fire test: {missing_firing}"
    assert not missing_quiet, f"alerts without a near-miss test: {missing_quiet}"


def _mutated_rules(tmp_path: Path, alertname: str, expr: str) -> Path:
    """A copy of the rules and their tests in which every rule of ``alertname`` has ``expr``."""
    rules_copy = tmp_path / "rules"
    rules_copy.mkdir(parents=True)
    for path in rule_files():
        content = load_yaml(path)
        for group in content["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == alertname:
                    rule["expr"] = expr
        (rules_copy / path.name).write_text(yaml.safe_dump(content, sort_keys=False))
    shutil.copytree(RULE_TESTS_DIR, tmp_path / "tests")
    return tmp_path / "tests"


@pytest.mark.parametrize("alertname", ALERTS)
def test_rule_tests_catch_an_alert_that_always_or_never_fires(
    alertname: str, tmp_path: Path
) -> None:
    """The promtool tests are only worth having if a broken rule makes them fail."""
    promtool = tool("promtool")
    for mutation, expr in (("always", "vector(1)"), ("never", "vector(1) == 0")):
        tests_dir = _mutated_rules(tmp_path / mutation, alertname, expr)
        test_files = sorted(
            str(path)
            for path in tests_dir.glob("*.yml")
            if f"alertname: {alertname}\n" in path.read_text()
        )
        result = run([promtool, "test", "rules", *test_files])
        output = result.stdout + result.stderr
        assert result.returncode != 0, f"{alertname} {mutation} firing went unnoticed"
        assert alertname in output, output


def test_alert_thresholds_are_configured_in_their_own_rule_file() -> None:
    thresholds = load_yaml(RULES_DIR / "dbops-thresholds.yml")
    records = [rule["record"] for group in thresholds["groups"] for rule in group["rules"]]
    assert "dbops:database_growth_threshold_bytes_per_day" in records
    growth = [rule for rule in alerting_rules() if rule["alert"] == "DbopsDatabaseGrowth"]
    assert all("dbops:database_growth_threshold_bytes_per_day" in r["expr"] for r in growth)


def test_no_rate_over_gauges_and_no_replication_lag_alert() -> None:
    """rate()/increase() only make sense on counters and histogram buckets."""
    for rule in alerting_rules() + [r for r in _all_recording()]:
        for function, metric in re.findall(r"\b(rate|irate|increase)\((\w+)", rule["expr"]):
            assert metric.endswith(("_total", "_bucket", "_count", "_sum")), (function, metric)
    assert not [r for r in alerting_rules() if "replication_lag" in r["expr"]]


def _all_recording() -> list[dict[str, Any]]:
    found = []
    for path in rule_files():
        for group in load_yaml(path)["groups"]:
            found += [rule for rule in group["rules"] if "record" in rule]
    return found


def test_readme_has_a_runbook_section_for_every_alert() -> None:
    text = README.read_text()
    headings = re.findall(r"^### (\w+)\s*$", text, flags=re.MULTILINE)
    for name in ALERTS:
        assert name in headings, f"monitoring/README.md has no '### {name}' runbook"
        section = text.split(f"### {name}", 1)[1].split("\n### ", 1)[0]
        assert "**Meaning**" in section and "**Runbook**" in section, name
