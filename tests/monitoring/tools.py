"""Paths of the monitoring content and the Prometheus tools that check it.

promtool and amtool come from Debian's ``prometheus`` and ``prometheus-alertmanager`` packages
(installed by .ci/run). A missing tool is a test failure, not a skip: these checks are the only
proof the rules and routes load.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
PROMETHEUS = MONITORING / "prometheus"
RULES_DIR = PROMETHEUS / "rules"
RULE_TESTS_DIR = PROMETHEUS / "tests"
ALERTMANAGER_CONFIG = MONITORING / "alertmanager" / "alertmanager.yml"
GRAFANA = MONITORING / "grafana"
DASHBOARDS_DIR = GRAFANA / "dashboards"
README = MONITORING / "README.md"

# The alert names the design relies on; every one must exist, be tested and have a runbook.
ALERTS = (
    "DbopsPoolSaturated",
    "DbopsPoolTimeouts",
    "DbopsServerConnectionsHigh",
    "DbopsPostgresDown",
    "DbopsSidecarDown",
    "DbopsBackupStale",
    "DbopsBackupFailed",
    "DbopsBackupVerifyStale",
    "DbopsSlowQueries",
    "DbopsDatabaseGrowth",
    "DbopsDeadlocks",
    "DbopsLongTransaction",
    "DbopsCollectorErrors",
    "DbopsWalStreamingDown",
    "DbopsWalSlotRetentionHigh",
    "DbopsWalSlotLost",
    "DbopsBaseBackupStale",
    "DbopsPitrDrillFailed",
    "DbopsPitrDrillStale",
    "DbopsOffsiteLag",
    "DbopsOffsiteUploadFailing",
)


def tool(name: str, *alternatives: str) -> str:
    for candidate in (name, *alternatives):
        path = shutil.which(candidate)
        if path:
            return path
    pytest.fail(
        f"{name} not found: install Debian's prometheus and prometheus-alertmanager packages"
    )


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS_DIR.glob("*.yml"))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    """Every rule of every rule file, each with the name of its group."""
    found = []
    for path in rule_files():
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                found.append({**rule, "group": group["name"], "file": path.name})
    return found


def recording_rules() -> list[str]:
    return [rule["record"] for rule in rules() if "record" in rule]


def alerting_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def dashboards() -> dict[str, dict[str, Any]]:
    paths = sorted(DASHBOARDS_DIR.glob("*.json"))
    return {path.name: json.loads(path.read_text()) for path in paths}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's panels with queries (rows only group them)."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


# a metric name in a PromQL expression (not a recording rule's name, not a function)
RULE_METRIC = re.compile(r"(?<![:\w])(dbops_\w+|up)(?![:\w(])")


def rule_metrics() -> list[str]:
    """Every metric name the alert and recording rules read."""
    return sorted({name for rule in rules() for name in RULE_METRIC.findall(rule["expr"])})
