"""The README's quick start, for real: `make up`, a backup and a restore, the demo workload pushing
its pool into saturation until DbopsPoolSaturated reaches Alertmanager, PostgreSQL going away
until DbopsPostgresDown fires, and `make down` leaving nothing behind.

The tests run in file order and share one stack; each states what it proves on its own.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import FIGURES, ROOT, Stack, seconds_in, volumes, wait_until

SEED_TABLES = ("agents", "users", "workflows", "tasks", "knowledge_base")
DATA_TABLES = (*SEED_TABLES, "sessions", "metrics", "alembic_version")


def rule_names() -> tuple[set[str], set[str]]:
    """Alert and recording rule names in the rule files the stack's Prometheus loads."""
    alerts, records = set(), set()
    for path in sorted((ROOT / "monitoring" / "prometheus" / "rules").glob("*.yml")):
        for group in yaml.safe_load(Path(path).read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    alerts.add(rule["alert"])
                else:
                    records.add(rule["record"])
    return alerts, records


def seed_fingerprint(stack: Stack) -> str:
    """Row counts and the newest change of every seeded table: a re-seed would move them."""
    parts = [
        f"(SELECT count(*) || '/' || coalesce(max(updated_at)::text, '-') FROM {table})"
        for table in SEED_TABLES
    ]
    return stack.psql("SELECT " + " || ' ' || ".join(parts))


def table_digest(stack: Stack, database: str) -> dict[str, str]:
    """Per table: row count and an md5 over its ordered rows; equal data, equal digests."""
    digests = {}
    for table in DATA_TABLES:
        digests[table] = stack.psql(
            "SELECT count(*) || ':' || "
            f"coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t",
            database,
        )
    return digests


@pytest.mark.timeout(900)
def test_make_up_brings_every_service_to_healthy_or_completed(stack: Stack) -> None:
    result = stack.make("up")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert stack.env_file.exists() and stack.env_file.stat().st_mode & 0o077 == 0
    containers = stack.containers()
    # the suite turns on the objectstore profile (conftest.py): its S3 server runs too
    assert set(containers) == {
        "postgres", "db-init", "ops", "prometheus", "alertmanager", "objectstore",
    }  # fmt: skip
    assert containers["db-init"]["State"]["Status"] == "exited"
    assert containers["db-init"]["State"]["ExitCode"] == 0
    for service in ("postgres", "ops", "prometheus", "alertmanager", "objectstore"):
        assert containers[service]["State"]["Health"]["Status"] == "healthy", service
    for port_name, path in (
        ("PROMETHEUS_PORT", ""),
        ("ALERTMANAGER_PORT", ""),
        ("OPS_PORT", "/metrics"),
    ):
        assert stack.url(port_name, path) in output
    stack.started = True
    start = seconds_in(output, r"healthy or completed: ([\d.]+) s from start")
    FIGURES["make up, fresh volumes, image built: start to all healthy"] = f"{start} s"
    FIGURES["make up including the image build"] = (
        str(seconds_in(output, r"\(([\d.]+) s including the build\)")) + " s"
    )


def test_services_connect_as_their_own_roles_not_the_superuser(stack: Stack) -> None:
    def client_roles() -> set[str]:
        roles = stack.psql(
            "SELECT string_agg(DISTINCT usename, ',') FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        return set(roles.split(",")) if roles else set()

    # the exporter's pool keeps its connection between Prometheus's scrapes
    roles = wait_until(lambda: client_roles() >= {"dbops_monitor"} and client_roles(), 60, "roles")
    assert roles <= {"dbops_monitor", "dbops_backup"}
    superusers = stack.psql("SELECT string_agg(rolname, ',') FROM pg_roles WHERE rolsuper")
    assert superusers == "dbops"


@pytest.mark.timeout(600)
def test_init_ran_once_and_a_second_up_does_not_reseed(stack: Stack) -> None:
    before = seed_fingerprint(stack)
    assert before.split(" ")[0].startswith("10/"), before  # the ten default agents
    first_run = stack.containers()["db-init"]["State"]["StartedAt"]

    result = stack.make("up")

    assert result.returncode == 0, result.stdout + result.stderr
    init = stack.containers()["db-init"]["State"]
    assert init["StartedAt"] != first_run, "the second `make up` did not run db-init again"
    assert init["ExitCode"] == 0
    assert seed_fingerprint(stack) == before
    again = seconds_in(result.stdout, r"healthy or completed: ([\d.]+) s from start")
    FIGURES["second make up (stack already running): to all healthy"] = f"{again} s"


def test_sidecar_serves_metrics_and_is_healthy_and_ready(stack: Stack) -> None:
    status, metrics = stack.get("OPS_PORT", "/metrics")
    assert status == 200
    assert "dbops_pg_up 1.0" in metrics
    assert 'dbops_pool_size{pool="dbops-sidecar"}' in metrics
    assert "dbops_pg_max_connections" in metrics
    assert "dbops_backup_max_age_seconds" in metrics
    assert stack.get("OPS_PORT", "/healthz")[0] == 200
    assert stack.get("OPS_PORT", "/readyz")[0] == 200


def test_a_new_stack_shows_no_down_target_and_no_pending_verify_alert(stack: Stack) -> None:
    # the demo workload's target exists only while it runs; nothing reads as broken before
    targets = stack.get_json("PROMETHEUS_PORT", "/api/v1/targets")["data"]["activeTargets"]
    assert "dbops-app" not in {t["labels"]["job"] for t in targets}
    wait_until(
        lambda: stack.prometheus_query(
            'dbops_backup_oldest_timestamp_seconds{job="dbops-sidecar"}'
        ),
        60,
        "the sidecar's backup metrics in Prometheus",
    )
    assert stack.prometheus_query('ALERTS{alertname="DbopsBackupVerifyStale"}') == []


@pytest.mark.timeout(600)
def test_backup_through_the_sidecar_restores_into_a_scratch_database_with_equal_data(
    stack: Stack,
) -> None:
    result = stack.make("backup")
    assert result.returncode == 0, result.stdout + result.stderr
    # one result line, not the log line and the printed line both
    assert (result.stdout + result.stderr).count(" ok: ") == 1, result.stdout + result.stderr
    listed = stack.exec_ops("backup", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    backups = json.loads(listed.stdout)
    entries = backups["backups"] if isinstance(backups, dict) else backups
    newest = max(entries, key=lambda entry: entry["id"])
    shown = stack.make("backups")
    assert shown.returncode == 0 and newest["id"] in shown.stdout, shown.stdout + shown.stderr

    restore = stack.make("restore", ID=newest["id"], TARGET_DB="e2e_restored")

    assert restore.returncode == 0, restore.stdout + restore.stderr
    original = table_digest(stack, "dbops")
    assert original["agents"].startswith("10:")
    assert table_digest(stack, "e2e_restored") == original
    # the sidecar's own restore drill (scratch database, row counts against the manifest)
    drill = stack.exec_ops("backup", "verify", "--drill", "--json", newest["id"])
    assert drill.returncode == 0 and json.loads(drill.stdout)["ok"] is True, drill.stdout
    verified = stack.make("verify", ID=newest["id"], DRILL="1")
    assert verified.returncode == 0 and "drill ok" in verified.stdout, verified.stdout


def test_make_restore_speaks_make_not_ops_options(stack: Stack) -> None:
    unknown = stack.make("restore", ID="20200101T000000Z-000000")
    assert unknown.returncode != 0
    assert "make backups" in unknown.stderr, unknown.stderr
    newest = max(
        json.loads(stack.exec_ops("backup", "list", "--json").stdout), key=lambda e: e["id"]
    )
    again = stack.make("restore", ID=newest["id"], TARGET_DB="e2e_restored")
    assert again.returncode != 0
    assert "FORCE=1" in again.stderr and "--force" not in again.stderr, again.stderr
    assert table_digest(stack, "e2e_restored")["agents"].startswith("10:")


@pytest.mark.timeout(600)
def test_replacing_the_live_database_takes_replace_live_and_keeps_the_old_one(
    stack: Stack,
) -> None:
    listed = stack.exec_ops("backup", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    backups = json.loads(listed.stdout)
    entries = backups["backups"] if isinstance(backups, dict) else backups
    newest = max(entry["id"] for entry in entries)
    stack.psql("CREATE TABLE e2e_after_backup (x int)")  # what the backup does not hold
    before = table_digest(stack, "dbops")

    refused = stack.make("restore", ID=newest, TARGET_DB="dbops", FORCE="1")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "FORCE=1 REPLACE_LIVE=1" in refused.stderr  # make's words, not ops's options
    assert stack.psql("SELECT to_regclass('e2e_after_backup') IS NOT NULL") == "t"

    done = stack.make("restore", ID=newest, TARGET_DB="dbops", FORCE="1", REPLACE_LIVE="1")

    assert done.returncode == 0, done.stdout + done.stderr
    kept = stack.psql(
        "SELECT string_agg(datname, ',') FROM pg_database WHERE datname LIKE 'dbops\\_replaced\\_%'"
    )
    assert kept and "," not in kept and f'kept as "{kept}"' in done.stdout
    assert stack.psql("SELECT to_regclass('e2e_after_backup') IS NULL") == "t"
    assert stack.psql("SELECT count(*) FROM e2e_after_backup", kept) == "0"
    assert table_digest(stack, kept) == before
    assert table_digest(stack, "dbops")["agents"].startswith("10:")
    # the restore ran as the owner, so the roles' privileges came back with the data
    assert stack.psql("SELECT has_table_privilege('dbops_app', 'tasks', 'INSERT')") == "t"
    wait_until(lambda: stack.get("OPS_PORT", "/readyz")[0] == 200, 60, "sidecar ready again")
    assert "dbops_pg_up 1.0" in stack.get("OPS_PORT", "/metrics")[1]


@pytest.mark.timeout(600)
def test_demo_workload_runs_as_the_application_role(stack: Stack) -> None:
    stack.demo_started = time.monotonic()
    result = stack.make("demo", WORKLOAD_MODE="saturate")
    assert result.returncode == 0, result.stdout + result.stderr
    assert stack.containers()["workload"]["State"]["Health"]["Status"] == "healthy"
    wait_until(
        lambda: (
            int(
                stack.psql(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE usename = 'dbops_app' AND application_name = 'dbops-workload'"
                )
            )
            > 0
        ),
        60,
        "workload connections as dbops_app",
    )
    status, metrics = stack.get("WORKLOAD_PORT", "/metrics")
    assert status == 200 and 'dbops_pool_size{pool="dbops-workload"} 5.0' in metrics


@pytest.mark.timeout(300)
def test_prometheus_scrapes_every_target_and_loads_every_rule(stack: Stack) -> None:
    def every_target_up() -> list[dict[str, str]]:
        targets = stack.get_json("PROMETHEUS_PORT", "/api/v1/targets")["data"]["activeTargets"]
        assert {t["labels"]["job"] for t in targets} >= {"dbops-sidecar", "dbops-app"}
        down = [
            f"{t['scrapeUrl']}: {t['health']} {t['lastError']}"
            for t in targets
            if t["health"] != "up"
        ]
        assert not down, down
        return targets

    wait_until(every_target_up, 120, "every Prometheus target up")
    groups = stack.get_json("PROMETHEUS_PORT", "/api/v1/rules")["data"]["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    alerts, records = rule_names()
    assert {r["name"] for r in loaded if r["type"] == "alerting"} == alerts
    assert {r["name"] for r in loaded if r["type"] == "recording"} == records
    assert [r["name"] for r in loaded if r["health"] != "ok"] == []
    assert len(alerts) >= 13


@pytest.mark.timeout(600)
def test_pool_saturation_fires_and_reaches_alertmanager_and_the_sidecar(stack: Stack) -> None:
    firing = wait_until(
        lambda: stack.firing("DbopsPoolSaturated"), 480, "DbopsPoolSaturated firing in Prometheus"
    )
    assert {alert["metric"]["pool"] for alert in firing} == {"dbops-workload"}
    FIGURES["WORKLOAD_MODE=saturate make demo to DbopsPoolSaturated firing"] = (
        f"{time.monotonic() - stack.demo_started:.0f} s (causes: "
        + ", ".join(sorted({alert["metric"]["cause"] for alert in firing}))
        + ")"
    )
    received = wait_until(
        lambda: stack.alertmanager_alerts("DbopsPoolSaturated"), 60, "alert at Alertmanager"
    )
    assert received[0]["labels"]["pool"] == "dbops-workload"
    assert received[0]["status"]["state"] == "active"

    def delivered_to_sidecar() -> bool:
        metrics = stack.get("OPS_PORT", "/metrics")[1]
        return (
            'dbops_alerts_received_total{alertname="DbopsPoolSaturated",status="firing"}' in metrics
        )

    # Alertmanager's warning route waits group_wait before its webhook posts to ops:9188/alerts.
    wait_until(delivered_to_sidecar, 90, "DbopsPoolSaturated delivered to the sidecar's /alerts")


def test_demo_stop_stops_the_workload_and_nothing_else(stack: Stack) -> None:
    result = stack.make("demo-stop")
    assert result.returncode == 0, result.stdout + result.stderr
    containers = stack.containers()
    assert "workload" not in containers
    for service in ("postgres", "ops", "prometheus", "alertmanager"):
        assert containers[service]["State"]["Status"] == "running", service


@pytest.mark.timeout(600)
@pytest.mark.timeout(900)
def test_make_recover_to_a_time_keeps_exactly_the_rows_up_to_it_and_streams_again(
    stack: Stack,
) -> None:
    def pitr_status() -> dict[str, Any]:
        result = stack.exec_ops("pitr", "status", "--json")
        return json.loads(result.stdout) if result.returncode == 0 else {}

    wait_until(
        lambda: (s := pitr_status()) and s["streaming"] and s["window_start"], 300, "a base backup"
    )
    stack.psql("CREATE TABLE recover_probe (id int PRIMARY KEY)")
    stack.psql("INSERT INTO recover_probe SELECT generate_series(1, 100)")
    target = stack.psql("SELECT clock_timestamp()")
    stack.psql("INSERT INTO recover_probe SELECT generate_series(101, 150)")

    started = time.monotonic()
    result = stack.make("recover", timeout=900, TIME=target)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert stack.psql("SELECT count(*) || ' ' || max(id) FROM recover_probe") == "100 100"
    kept = re.search(r"kept in volume (\S+)", result.stdout)
    assert kept and volumes().get(kept.group(1)) == stack.project, result.stdout[-2000:]
    assert "recover_probe 100" in result.stdout and "timeline 2" in result.stdout
    FIGURES["make recover TIME=T: stop, keep, restore, replay, promote, restart"] = f"{took:.1f} s"
    stack.psql("DROP TABLE recover_probe")  # not a platform table: ops db check would say so
    checked = stack.exec_ops("db", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # the sidecar follows the new timeline with a fresh base backup, streaming again
    wait_until(
        lambda: (
            (s := pitr_status())
            and s["streaming"]
            and str(s["last_wal_archived"]).startswith("00000002")
        ),
        300,
        "streaming on timeline 2",
    )


@pytest.mark.timeout(1200)
def test_plain_make_recover_keeps_every_committed_row_and_going_back_restores_the_state_before(
    stack: Stack,
) -> None:
    """Plain `make recover` (the latest point), on the stack the previous test recovered to a
    time: every committed row is there afterwards. Then README's way back, from the volume the
    output names, gives the data from just before the recovery (without what was written after)."""
    stack.psql("CREATE TABLE latest_probe (id int PRIMARY KEY)")
    for first in range(1, 500, 100):  # five transactions, each committed before make recover
        stack.psql(f"INSERT INTO latest_probe SELECT generate_series({first}, {first + 99})")
    before = {
        **table_digest(stack, "dbops"),
        "latest_probe": stack.psql("SELECT count(*) || ' ' || max(id) FROM latest_probe"),
    }
    assert before["latest_probe"] == "500 500"

    started = time.monotonic()
    result = stack.make("recover", timeout=900)
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "recovering the database to the latest point" in output
    assert stack.psql("SELECT count(*) || ' ' || max(id) FROM latest_probe") == "500 500"
    assert table_digest(stack, "dbops") == {k: v for k, v in before.items() if k != "latest_probe"}
    assert "latest_probe 500" in result.stdout and "timeline 3" in result.stdout
    FIGURES["make recover (latest point): stop, keep, restore, replay, promote, restart"] = (
        f"{took:.1f} s"
    )
    stack.psql("INSERT INTO latest_probe VALUES (501)")  # after the recovery: going back drops it

    kept = re.search(r"kept in volume (\S+)", result.stdout)
    back = re.search(
        r"to go back, run `make down`, then `(docker run [^`]+)`, then `make up`", result.stdout
    )
    assert kept and back and kept.group(1) in back.group(1), result.stdout[-2000:]
    down = stack.make("down")
    assert down.returncode == 0, down.stdout + down.stderr
    copied = subprocess.run(
        shlex.split(back.group(1)), capture_output=True, text=True, timeout=300, check=False
    )
    assert copied.returncode == 0, copied.stdout + copied.stderr
    up = stack.make("up")
    assert up.returncode == 0, up.stdout + up.stderr
    assert stack.psql("SELECT count(*) || ' ' || max(id) FROM latest_probe") == "500 500"
    assert {**table_digest(stack, "dbops"), "latest_probe": "500 500"} == before
    assert (
        stack.psql(
            "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
        )
        == "2"
    )  # the timeline from before the recovery, not the recovered one
    # the sidecar sets the later timeline's streamed files aside and streams timeline 2 again
    wait_until(
        lambda: json.loads(stack.exec_ops("pitr", "status", "--json").stdout or "{}").get(
            "streaming"
        ),
        300,
        "streaming again after going back",
    )
    stack.psql("DROP TABLE latest_probe")


def test_stopping_postgres_fires_postgres_down_and_the_sidecar_keeps_running(stack: Stack) -> None:
    stopped = stack.compose("stop", "postgres")
    assert stopped.returncode == 0, stopped.stderr

    wait_until(
        lambda: "dbops_pg_up 0.0" in stack.get("OPS_PORT", "/metrics")[1], 60, "dbops_pg_up 0"
    )
    wait_until(lambda: stack.firing("DbopsPostgresDown"), 240, "DbopsPostgresDown firing")
    wait_until(
        lambda: stack.alertmanager_alerts("DbopsPostgresDown"),
        60,
        "DbopsPostgresDown at Alertmanager",
    )
    sidecar = stack.containers()["ops"]["State"]
    assert sidecar["Status"] == "running" and sidecar["Restarting"] is False
    assert stack.get("OPS_PORT", "/healthz")[0] == 200
    assert stack.get("OPS_PORT", "/readyz")[0] == 503


@pytest.mark.timeout(300)
def test_make_down_leaves_no_containers(stack: Stack) -> None:
    result = stack.make("down")
    assert result.returncode == 0, result.stdout + result.stderr
    assert stack.containers() == {}
    # data stays in the project's named volumes; nothing anonymous is left behind
    left = {
        name: project for name, project in volumes().items() if name not in stack.volumes_before
    }
    assert left and set(left.values()) == {stack.project}, left
