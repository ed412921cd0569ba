"""The monitoring content against a live system: real PostgreSQL, ``ops serve``, an instrumented
pool under load, Prometheus and Alertmanager with this repository's configuration and rules.

Every recording rule must return data, every dashboard query (variables substituted with the
values Grafana would offer) must be valid and return a series, every metric an alert reads must
exist, each scrape must pass ``promtool check metrics``, and an alert must travel from a rule
through Alertmanager to the sidecar's webhook.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from db.engine import create_engine
from db.settings import load_db_settings
from tests.conftest import Server, env_for
from tests.monitoring.live import APP_POOL, LiveStack, http_get
from tests.monitoring.tools import dashboards, panels, recording_rules, rule_metrics, tool
from tests.pgcluster import wait_for

pytestmark = pytest.mark.timeout(240)

RATE_INTERVAL = "15s"  # what $__rate_interval is at 1 s scrapes, with room to spare
LABEL_VALUES = re.compile(r"label_values\((.*),\s*(\w+)\)")


@pytest.fixture(scope="module")
def live(pg: Server) -> Iterator[LiveStack]:
    database = pg.create_database(template=pg.migrated_template())
    url: URL = pg.url(database)
    settings = load_db_settings(env_for(url, DB_APPLICATION_NAME=APP_POOL))
    engine = create_engine(settings, pool_size=2, max_overflow=1, pool_timeout=0.5)
    stack = LiveStack(url, engine)
    try:
        stack.start()
        yield stack
        assert not stack.load.errors, stack.load.errors
    finally:
        stack.stop()
        engine.dispose()
        pg.drop_database(database)


def eventually(check: Any, timeout: float = 30) -> Any:
    """Poll ``check()`` (a list of problems) until it is empty or time runs out."""
    problems = check()
    deadline = time.monotonic() + timeout
    while problems and time.monotonic() < deadline:
        time.sleep(1)
        problems = check()
    return problems


def test_every_target_is_scraped(live: LiveStack) -> None:
    def down() -> list[str]:
        targets = live.prometheus.api("targets")["activeTargets"]
        seen = {t["labels"]["job"]: t["health"] for t in targets}
        return [f"{job}: {seen.get(job)}" for job in live.ports if seen.get(job) != "up"]

    assert not eventually(down), live.logs()


def test_every_recording_rule_returns_data(live: LiveStack) -> None:
    names = recording_rules()
    assert len(names) >= 11

    def empty() -> list[str]:
        return [name for name in names if not live.prometheus.query(name)]

    assert not eventually(empty, 45), live.logs()


def test_every_metric_the_rules_read_is_exported(live: LiveStack) -> None:
    # dbops_pitr_* come from a sidecar streaming WAL through Barman, which this stack does not
    # run: tests/integration/test_pitr_serve.py checks those names against its own scrape, and
    # tests/integration/test_offsite_serve.py the dbops_offsite_* ones (a sidecar shipping to S3).
    wanted = [
        name for name in rule_metrics() if not name.startswith(("dbops_pitr_", "dbops_offsite_"))
    ]
    assert "dbops_pool_checked_out" in wanted and "dbops_backup_max_age_seconds" in wanted

    def missing() -> list[str]:
        return [name for name in wanted if not live.prometheus.query(f"count({name})")]

    assert not eventually(missing), live.logs()


def substitute(expr: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return expr.replace("$__rate_interval", RATE_INTERVAL)


def variable_values(live: LiveStack, board: dict[str, Any]) -> dict[str, str]:
    """Each variable as Grafana sends a multi-value "All": a regex of every value it offers."""
    values: dict[str, str] = {}
    for variable in board["templating"]["list"]:
        match = LABEL_VALUES.fullmatch(substitute(variable["definition"], values))
        assert match, variable["definition"]
        selector, label = match.groups()
        found = live.prometheus.label_values(selector, label)
        assert found, f"{board['uid']}: variable {variable['name']} has no values"
        alternatives = "|".join(re.escape(value) for value in found)
        values[variable["name"]] = f"({alternatives})".replace("\\", "\\\\")
    return values


# This stack runs no PITR: the Recovery dashboard's queries are proven against a sidecar that
# streams WAL and has run a drill, in tests/integration/test_pitr_dashboard.py.
PROVEN_ELSEWHERE = {"recovery.json"}


def dashboard_queries(live: LiveStack) -> list[tuple[str, dict[str, Any]]]:
    queries = []
    for name, board in dashboards().items():
        if name in PROVEN_ELSEWHERE:
            continue
        values = variable_values(live, board)
        for panel in panels(board):
            for target in panel["targets"]:
                resolved = {**target, "expr": substitute(target["expr"], values)}
                queries.append((f"{name} / {panel['title']} / {target['refId']}", resolved))
    return queries


def test_every_dashboard_query_is_valid_and_returns_series(live: LiveStack) -> None:
    queries = dashboard_queries(live)
    assert len(queries) >= 60

    def empty() -> list[str]:
        problems = []
        for where, target in queries:
            if "$" in target["expr"]:
                problems.append(f"{where}: unsubstituted variable in {target['expr']}")
                continue
            if target["instant"]:
                result = live.prometheus.query(target["expr"])
            else:
                result = live.prometheus.query_range(target["expr"])
            if not result:
                problems.append(f"{where}: no series for {target['expr']}")
        return problems

    assert not eventually(empty, 45)


def test_promtool_check_metrics_passes_on_each_scrape(live: LiveStack) -> None:
    promtool = tool("promtool")
    for job in ("dbops-sidecar", "dbops-app"):
        status, body = http_get(f"http://127.0.0.1:{live.ports[job]}/metrics")
        assert status == 200, job
        assert "dbops_" in body
        result = subprocess.run(
            [promtool, "check", "metrics"],
            input=body,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"{job}: {result.stdout}{result.stderr}"


def test_a_pool_timeout_alert_reaches_the_sidecar_webhook(live: LiveStack) -> None:
    """DbopsPoolTimeouts fires on the real timeout, routes as critical and is logged."""

    def not_firing() -> list[str]:
        alerts = live.prometheus.api("alerts")["alerts"]
        firing = [
            a
            for a in alerts
            if a["labels"]["alertname"] == "DbopsPoolTimeouts"
            and a["labels"].get("pool") == APP_POOL
            and a["state"] == "firing"
        ]
        return [] if firing else ["DbopsPoolTimeouts is not firing"]

    assert not eventually(not_firing, 45), live.logs()
    sidecar = f"http://127.0.0.1:{live.ports['dbops-sidecar']}/metrics"
    received = 'dbops_alerts_received_total{alertname="DbopsPoolTimeouts",status="firing"}'

    def delivered() -> bool:
        status, body = http_get(sidecar)
        return status == 200 and any(
            line.startswith(received) and float(line.split()[-1]) >= 1 for line in body.splitlines()
        )

    assert wait_for(delivered, 45, interval=1), live.logs()
    assert "DbopsPoolTimeouts" in (live.dir / "sidecar.log").read_text()


def test_alertmanager_inhibits_a_warning_while_the_same_alert_is_critical(
    live: LiveStack,
) -> None:
    base = f"http://127.0.0.1:{live.ports['alertmanager']}/api/v2/alerts"

    def alert(severity: str, instance: str) -> dict[str, Any]:
        return {
            "labels": {
                "alertname": "DbopsServerConnectionsHigh",
                "severity": severity,
                "job": "dbops-sidecar",
                "instance": instance,
            },
            "annotations": {"summary": "inhibition check"},
        }

    posted = [
        alert("critical", "inhibit-check:1"),
        alert("warning", "inhibit-check:1"),
        alert("warning", "inhibit-check:2"),
    ]
    request = urllib.request.Request(
        base, data=json.dumps(posted).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200

    def states() -> dict[tuple[str, str], str]:
        status, body = http_get(base)
        assert status == 200
        return {
            (a["labels"]["severity"], a["labels"]["instance"]): a["status"]["state"]
            for a in json.loads(body)
            if a["labels"]["instance"].startswith("inhibit-check")
        }

    expected = {
        ("critical", "inhibit-check:1"): "active",
        ("warning", "inhibit-check:1"): "suppressed",
        ("warning", "inhibit-check:2"): "active",
    }
    assert wait_for(lambda: states() == expected, 15, interval=0.5), states()


def test_recording_rules_compute_what_they_claim(live: LiveStack) -> None:
    """Not just data: values in range and, for server saturation, equal to PostgreSQL's count."""
    database = live.url.database
    prometheus = live.prometheus

    def value(expr: str) -> float:
        result = prometheus.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def settled() -> list[str]:
        pool = f'{{pool="{APP_POOL}", operation="update"}}'
        checks = {
            f'pool:dbops_pool_utilisation:ratio{{pool="{APP_POOL}"}}': (0.0, 1.0),
            f"pool_operation:dbops_query_duration_seconds:p95_5m{pool}": (1e-5, 1.0),
            f'datname:dbops_pg_transactions:rate5m{{datname="{database}"}}': (1.0, 10_000.0),
            f'datname:dbops_pg_blks_hit:ratio_rate5m{{datname="{database}"}}': (0.5, 1.0),
            "instance:dbops_backup_age_seconds": (0.0, 900.0),
            "instance:dbops_backup_verify_age_seconds": (0.0, 900.0),
        }
        problems = []
        for expr, (low, high) in checks.items():
            result = prometheus.query(expr)
            if len(result) != 1 or not low <= float(result[0]["value"][1]) <= high:
                problems.append(f"{expr} = {result}, expected within [{low}, {high}]")
        return problems

    assert not eventually(settled, 30)
    assert value("dbops:database_growth_threshold_bytes_per_day") == 1073741824

    # Connections of its own (the app pool is kept busy by the load): ten held open so the
    # count is well above the pools' coming and going.
    engine = sa_create_engine(live.url, poolclass=NullPool)
    held = [engine.connect() for _ in range(10)]
    try:
        usable = (
            held[0]
            .execute(
                text(
                    "SELECT current_setting('max_connections')::int"
                    " - current_setting('superuser_reserved_connections')::int"
                )
            )
            .scalar_one()
        )
        assert value("dbops_pg_max_connections - dbops_pg_reserved_connections") == usable

        def mismatch() -> list[str]:
            clients = (
                held[0]
                .execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE backend_type = 'client backend'"
                    )
                )
                .scalar_one()
            )
            held[0].rollback()  # pg_stat_activity is a snapshot per transaction
            implied = value("instance:dbops_pg_connections:saturation_ratio") * usable
            if clients >= 14 and abs(implied - clients) <= 2.5:
                return []
            return [f"{implied} connections by the rule, {clients} in pg_stat_activity"]

        assert not eventually(mismatch, 15)
    finally:
        for connection in held:
            connection.close()
        engine.dispose()


def test_a_healthy_stack_raises_no_alert_but_the_induced_timeout(live: LiveStack) -> None:
    """False positives page people: only the pool timeout this module causes may be active."""
    induced = {("DbopsPoolTimeouts", APP_POOL), ("DbopsPoolSaturated", APP_POOL)}
    for _ in range(5):
        alerts = live.prometheus.api("alerts")["alerts"]
        unexpected = [
            (alert["labels"], alert["state"])
            for alert in alerts
            if (alert["labels"]["alertname"], alert["labels"].get("pool")) not in induced
        ]
        assert not unexpected
        time.sleep(1)
