"""The Recovery dashboard against a live Prometheus scraping a sidecar that does PITR for real.

The live stack of tests/monitoring runs no PITR, so the Recovery dashboard is proven here:
``ops serve`` streams WAL from a real cluster, takes its base backup, a drill has run, and
Prometheus (this repository's scrape job, 1 s interval) scrapes it. Every panel's query, its
``instance`` variable filled in as Grafana would, must return a series. One ``barman check``
item fails on purpose (PITR_MIN_REDUNDANCY=2 with one base backup) so that the panel naming
failing checks has something real to show.

Off-host panels (title "Off-host ...") read ``dbops_offsite_*``, which a sidecar exports only
with an object store configured: the sidecar here ships to a real S3 server (moto, from
tests/objectstore.py), so those panels are proven the same way.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.pitr_helpers import REPO, execute, ops_json, pitr_env
from tests.integration.test_backup_serve import get, metric
from tests.monitoring.live import Process, Prometheus, http_get
from tests.monitoring.tools import PROMETHEUS, dashboards, panels, tool
from tests.objectstore import ObjectStore
from tests.pgcluster import Cluster, free_port, wait_for

pytestmark = pytest.mark.timeout(420)

BOARD = "recovery.json"
OFFSITE_TITLE = "Off-host"
LABEL_VALUES = re.compile(r"label_values\((.*),\s*(\w+)\)")


def prometheus_config(sidecar_port: int) -> dict[str, Any]:
    """This repository's global settings and sidecar job, at 1 s, pointed at the local sidecar."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "dbops-sidecar"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{sidecar_port}"]}]
    return {
        "global": {
            **config["global"],
            "scrape_interval": "1s",
            "evaluation_interval": "1s",
            "scrape_timeout": "1s",
        },
        "scrape_configs": [job],
    }


def is_offsite(panel: dict[str, Any]) -> bool:
    return str(panel["title"]).startswith(OFFSITE_TITLE)


def test_off_host_panels_are_exactly_those_reading_offsite_metrics() -> None:
    board = dashboards()[BOARD]
    for panel in panels(board):
        reads_offsite = any("dbops_offsite_" in t["expr"] for t in panel["targets"])
        reads_local = any("dbops_pitr_" in t["expr"] for t in panel["targets"])
        assert reads_offsite == is_offsite(panel), panel["title"]
        assert reads_local != reads_offsite, f"{panel['title']}: mixes local and off-host"
    assert len([p for p in panels(board) if is_offsite(p)]) >= 4


def resolve(prometheus: Prometheus, board: dict[str, Any]) -> dict[str, str]:
    """Each variable as Grafana sends a multi-value "All": a regex of every value it offers."""
    values: dict[str, str] = {}
    for variable in board["templating"]["list"]:
        match = LABEL_VALUES.fullmatch(variable["definition"])
        assert match, variable["definition"]
        found = prometheus.label_values(*match.groups())
        assert found, f"variable {variable['name']} has no values"
        # escaped for the regex, then for the PromQL string it sits in
        alternatives = "(" + "|".join(re.escape(v) for v in found) + ")"
        values[variable["name"]] = alternatives.replace("\\", "\\\\")
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return expr.replace("$__rate_interval", "15s")


def test_every_recovery_panel_returns_data_from_a_pitr_sidecar(
    cluster: Cluster, tmp_path: Path, object_store: ObjectStore, bucket: str
) -> None:
    sidecar_port, prometheus_port = free_port(), free_port()
    env = pitr_env(
        cluster,
        tmp_path / "pitr",
        OPS_LISTEN=f"127.0.0.1:{sidecar_port}",
        PITR_ARCHIVE_TIMEOUT="2s",
        PITR_CRON_INTERVAL="5s",
        PITR_MIN_REDUNDANCY="2",  # one base backup: Barman's redundancy check fails, for real
        OFFSITE_DIR=str(tmp_path / "offsite"),
        **object_store.env(bucket),
    )
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    prometheus: Process | None = None
    try:
        assert wait_for(lambda: get(sidecar_port, "/metrics")[0] == 200, 30), (
            sidecar.poll() is not None and sidecar.communicate()[1][-2000:]
        )
        assert wait_for(
            lambda: metric(sidecar_port, "dbops_pitr_base_backups_retained") == 1.0, 180
        )
        execute(cluster.url(), "CREATE TABLE orders AS SELECT generate_series(1, 1000) AS id")
        drilled = ops_json("pitr", "drill", env=env)
        assert drilled["ok"] and drilled["kept"], drilled
        assert wait_for(lambda: metric(sidecar_port, "dbops_pitr_streaming_up") == 1.0, 60)

        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(sidecar_port)))
        prometheus = Process(
            "prometheus",
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--storage.tsdb.retention.time=1h",
            ],
            tmp_path,
        )
        live = Prometheus(f"http://127.0.0.1:{prometheus_port}")
        ready = f"{live.base}/-/ready"
        assert wait_for(lambda: http_get(ready)[0] == 200, 30), prometheus.output()
        assert wait_for(lambda: live.query("dbops_pitr_drill_last_ok == 1"), 30, 0.5)
        shipped = "dbops_offsite_recovery_window_start_timestamp_seconds > 0"
        assert wait_for(lambda: live.query(shipped), 120, 1), "no base backup shipped off host"

        board = dashboards()[BOARD]
        values = resolve(live, board)
        checked = []
        for panel in panels(board):
            for target in panel["targets"]:
                expr = substitute(target["expr"], values)
                assert "$" not in expr, expr
                checked.append((f"{panel['title']} / {target['refId']}", expr, target["instant"]))

        def empty() -> list[str]:
            problems = []
            for where, expr, instant in checked:
                found = live.query(expr) if instant else live.query_range(expr, 10, 1)
                if not found:
                    problems.append(f"{where}: no series for {expr}")
            return problems

        assert wait_for(lambda: not empty(), 45, 1), "\n".join(empty())
        assert len(checked) >= 30
        failing = live.query(substitute("dbops_pitr_check_failed", values))
        assert [s["metric"]["check"] for s in failing] == ["minimum_redundancy_requirements"]
        assert {where.split(" / ")[0] for where, _, _ in checked} >= {
            str(panel["title"]) for panel in panels(board) if is_offsite(panel)
        }
    finally:
        if prometheus is not None:
            prometheus.stop()
        sidecar.send_signal(signal.SIGTERM)
        try:
            sidecar.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            sidecar.kill()
            sidecar.communicate()
