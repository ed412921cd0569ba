"""The monitoring content on Kubernetes is the compose stack's: the PrometheusRule carries the
rule files' groups unchanged (promtool checks them and runs the existing unit tests against
them), the dashboards are byte-for-byte the compose ones, and the CloudNativePG bridge keeps our
alerts firing from the instances' own metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kubernetes.kube import DEPLOY, ROOT, Resource, find, one, run
from tests.monitoring.tools import DASHBOARDS_DIR, RULE_TESTS_DIR, RULES_DIR, tool

CNPG_RULES = DEPLOY / "components" / "cloudnative-pg" / "rules"
BRIDGE_TESTS = Path(__file__).resolve().parent / "rule_tests"
# Client-side apply keeps the whole object in an annotation, and annotations may hold 256 KiB.
ANNOTATION_LIMIT = 262144


def source_groups(directory: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: yaml.safe_load(path.read_text())["groups"]
        for path in sorted(directory.glob("*.yml"))
    }


def write_groups_as_files(groups: list[dict[str, Any]], sources: Path, target: Path) -> None:
    """The PrometheusRule's groups, written back under the file names they came from, so the
    unit tests' rule_files resolve. Every group must land in exactly one file."""
    by_name = {group["name"]: group for group in groups}
    assert len(by_name) == len(groups), "duplicate group names"
    target.mkdir(parents=True)
    for filename, original in source_groups(sources).items():
        chosen = [by_name.pop(group["name"]) for group in original]
        (target / filename).write_text(yaml.safe_dump({"groups": chosen}, sort_keys=False))
    assert not by_name, f"groups with no source file: {sorted(by_name)}"


def rule(resources: list[Resource], name: str) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = one(resources, "PrometheusRule", name)["spec"]["groups"]
    return groups


@pytest.fixture(scope="module")
def cnpg(rendered: dict[str, list[Resource]]) -> list[Resource]:
    return rendered["cnpg-kube-prometheus"]


def test_prometheusrule_groups_are_the_rule_files_groups_unchanged(cnpg: list[Resource]) -> None:
    expected = [group for groups in source_groups(RULES_DIR).values() for group in groups]
    assert rule(cnpg, "dbops") == expected
    bridge = [group for groups in source_groups(CNPG_RULES).values() for group in groups]
    assert rule(cnpg, "dbops-cloudnative-pg") == bridge


def test_prometheusrule_groups_pass_promtool_check_rules(
    cnpg: list[Resource], tmp_path: Path
) -> None:
    groups = [*rule(cnpg, "dbops"), *rule(cnpg, "dbops-cloudnative-pg")]
    path = tmp_path / "prometheusrule.yml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = run([tool("promtool"), "check", "rules", "--lint-fatal", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_existing_promtool_unit_tests_pass_unchanged_against_the_prometheusrule(
    cnpg: list[Resource], tmp_path: Path
) -> None:
    write_groups_as_files(rule(cnpg, "dbops"), RULES_DIR, tmp_path / "rules")
    shutil.copytree(RULE_TESTS_DIR, tmp_path / "tests")
    tests = sorted((tmp_path / "tests").glob("*.yml"))
    assert tests
    for test in tests:
        assert test.read_bytes() == (RULE_TESTS_DIR / test.name).read_bytes()
    result = run([tool("promtool"), "test", "rules", *map(str, tests)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_bridge_rules_fire_our_alerts_from_cloudnative_pg_metrics(
    cnpg: list[Resource], tmp_path: Path
) -> None:
    write_groups_as_files(rule(cnpg, "dbops"), RULES_DIR, tmp_path / "rules")
    write_groups_as_files(rule(cnpg, "dbops-cloudnative-pg"), CNPG_RULES, tmp_path / "cnpg")
    shutil.copytree(BRIDGE_TESTS, tmp_path / "tests")
    tests = sorted((tmp_path / "tests").glob("*.yml"))
    assert tests
    result = run([tool("promtool"), "test", "rules", *map(str, tests)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_bridge_tests_fail_when_a_bridge_rule_is_broken(
    cnpg: list[Resource], tmp_path: Path
) -> None:
    """The bridge tests are only worth having if a wrong mapping makes them fail."""
    groups = json.loads(json.dumps(rule(cnpg, "dbops-cloudnative-pg")))
    for group in groups:
        for item in group["rules"]:
            if item.get("record") == "dbops_pg_deadlocks_total":
                item["expr"] = "cnpg_pg_stat_database_conflicts"
    write_groups_as_files(rule(cnpg, "dbops"), RULES_DIR, tmp_path / "rules")
    write_groups_as_files(groups, CNPG_RULES, tmp_path / "cnpg")
    shutil.copytree(BRIDGE_TESTS, tmp_path / "tests")
    result = run(
        [tool("promtool"), "test", "rules", *map(str, sorted((tmp_path / "tests").glob("*.yml")))]
    )
    assert result.returncode != 0
    assert "DbopsDeadlocks" in result.stdout + result.stderr


def test_bridge_covers_the_metrics_of_every_collector_it_disables(cnpg: list[Resource]) -> None:
    """What OPS_COLLECTORS_DISABLED switches off, the bridge must record again (the names that
    rules and dashboards read)."""
    settings = next(
        r for r in find(cnpg, "ConfigMap") if r["metadata"]["name"].startswith("dbops-settings")
    )
    disabled = settings["data"]["OPS_COLLECTORS_DISABLED"].split(",")
    exported = {
        "activity": {
            "dbops_pg_connections",
            "dbops_pg_longest_transaction_seconds",
            "dbops_pg_idle_in_transaction_connections",
            "dbops_pg_max_connections",
            "dbops_pg_reserved_connections",
        },
        "databases": {
            "dbops_pg_xact_commit_total",
            "dbops_pg_xact_rollback_total",
            "dbops_pg_blks_hit_total",
            "dbops_pg_blks_read_total",
            "dbops_pg_deadlocks_total",
        },
        "replication": {
            "dbops_pg_replication_lag_seconds",
            "dbops_pg_in_recovery",
            "dbops_pg_standbys",
        },
    }
    assert set(disabled) == set(exported)
    recorded = {
        item["record"]
        for group in rule(cnpg, "dbops-cloudnative-pg")
        for item in group["rules"]
        if "record" in item
    }
    for collector in disabled:
        assert exported[collector] <= recorded, collector


def test_exporter_names_of_disabled_collectors_match_the_collectors_code() -> None:
    """The names above are the collectors' own (a renamed metric must not slip past)."""
    sources = {
        "activity": ROOT / "ops" / "collectors" / "activity.py",
        "databases": ROOT / "ops" / "collectors" / "databases.py",
        "replication": ROOT / "ops" / "collectors" / "replication.py",
    }
    text = {name: path.read_text() for name, path in sources.items()}
    assert '"dbops_pg_connections"' in text["activity"]
    assert '"dbops_pg_longest_transaction_seconds"' in text["activity"]
    assert '"dbops_pg_deadlocks"' in text["databases"]
    assert '"dbops_pg_replication_lag_seconds"' in text["replication"]


def test_dashboards_are_byte_for_byte_the_compose_ones_labelled_for_grafana(
    overlay: str, rendered: dict[str, list[Resource]]
) -> None:
    files = sorted(DASHBOARDS_DIR.glob("*.json"))
    assert files
    maps = {r["metadata"]["name"]: r for r in find(rendered[overlay], "ConfigMap")}
    for path in files:
        configmap = maps[f"dbops-dashboard-{path.stem}"]
        assert configmap["data"] == {path.name: path.read_text(encoding="utf-8")}
        assert configmap["data"][path.name].encode("utf-8") == path.read_bytes()
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["metadata"]["annotations"]["grafana_folder"] == "dbops"
        assert len(json.dumps(configmap)) < ANNOTATION_LIMIT, path.name


def test_standalone_mounts_the_compose_stacks_own_files(
    rendered: dict[str, list[Resource]],
) -> None:
    resources = rendered["standalone"]
    expected = {
        "prometheus-config": [ROOT / "monitoring/prometheus/prometheus.yml"],
        "prometheus-rules": sorted(RULES_DIR.glob("*.yml")),
        "alertmanager-config": [ROOT / "monitoring/alertmanager/alertmanager.yml"],
        "grafana-datasources": [
            ROOT / "monitoring/grafana/provisioning/datasources/prometheus.yml"
        ],
        "grafana-dashboard-providers": [
            ROOT / "monitoring/grafana/provisioning/dashboards/dbops.yml"
        ],
        "postgres-initdb": sorted((ROOT / "docker/postgres/initdb").glob("*")),
    }
    for prefix, paths in expected.items():
        (configmap,) = [
            r
            for r in find(resources, "ConfigMap")
            if r["metadata"]["name"].rsplit("-", 1)[0] == prefix
        ]
        assert configmap["data"] == {p.name: p.read_text(encoding="utf-8") for p in paths}


def test_every_cloudnative_pg_alert_has_a_runbook_beside_the_manifests() -> None:
    readme = (DEPLOY / "README.md").read_text()
    anchors = {
        "#" + line.lstrip("#").strip().lower()
        for line in readme.splitlines()
        if line.startswith("### ")
    }
    alerts = [
        item
        for groups in source_groups(CNPG_RULES).values()
        for group in groups
        for item in group["rules"]
        if "alert" in item
    ]
    assert alerts
    for alert in alerts:
        path, _, anchor = alert["annotations"]["runbook"].partition("#")
        assert path == "deploy/kubernetes/README.md"
        assert f"#{anchor}" in anchors and anchor == alert["alert"].lower(), alert["alert"]
