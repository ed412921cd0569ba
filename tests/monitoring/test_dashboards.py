"""Grafana dashboards and provisioning: generated JSON is current and every panel is complete.

Whether the queries return data is proven against a live Prometheus in test_live_prometheus.py,
and for the Recovery dashboard (PITR) in tests/integration/test_pitr_dashboard.py.
"""

from __future__ import annotations

import re
import subprocess
import sys

from tests.monitoring.tools import GRAFANA, dashboards, load_yaml, panels

EXPECTED = {
    "dbops-overview",
    "dbops-pools",
    "dbops-queries",
    "dbops-storage",
    "dbops-backups",
    "dbops-recovery",
}
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


def datasource_uid() -> str:
    provisioned = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    return str(source["uid"])


def test_committed_dashboards_match_their_generator() -> None:
    result = subprocess.run(
        [sys.executable, str(GRAFANA / "generate_dashboards.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_six_dashboards_are_provisioned_from_the_mounted_directory() -> None:
    assert {board["uid"] for board in dashboards().values()} == EXPECTED
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dbops.yml")["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_every_panel_has_a_unit_the_datasource_and_queries() -> None:
    uid = datasource_uid()
    for name, board in dashboards().items():
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in panels(board):
            where = f"{name}: {panel['title']}"
            assert panel["fieldConfig"]["defaults"].get("unit"), where
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, where
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["expr"].strip(), where
                assert target["datasource"]["uid"] == uid, where


def test_every_dashboard_has_instance_and_pool_variables_where_used() -> None:
    seen: set[str] = set()
    for name, board in dashboards().items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert "instance" in variables, name
        used: set[str] = set()
        for panel in panels(board):
            for target in panel["targets"]:
                for match in VARIABLE.finditer(target["expr"]):
                    used.add(match.group(1) or match.group(2))
        for variable in variables.values():
            for match in VARIABLE.finditer(variable["definition"]):
                used.add(match.group(1) or match.group(2))
        used -= GRAFANA_BUILTINS
        assert used == set(variables), f"{name}: defined {set(variables)}, used {used}"
        for variable in variables.values():
            assert variable["datasource"]["uid"] == datasource_uid()
            assert variable["definition"].startswith("label_values("), variable["name"]
        seen |= set(variables)
    assert {"instance", "pool"} <= seen


def test_panels_fit_the_grid_without_overlapping() -> None:
    for name, board in dashboards().items():
        cells: dict[tuple[int, int], str] = {}
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, (name, panel["title"])
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in cells, f"{name}: {panel['title']} overlaps {cells[x, y]}"
                    cells[x, y] = panel["title"]
