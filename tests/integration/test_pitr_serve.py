"""``ops serve`` with PITR on, as a process: it starts streaming, takes the first base backup by
itself, exports ``dbops_pitr_*`` that promtool accepts, and stops streaming on SIGTERM."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.integration.pitr_helpers import REPO, execute, pitr_env
from tests.integration.test_backup_serve import get, metric
from tests.monitoring.tools import rule_metrics
from tests.pgcluster import Cluster, free_port, wait_for


def streamers(cluster: Cluster) -> int:
    rows = execute(
        cluster.url(),
        "SELECT count(*) FROM pg_stat_replication "
        "WHERE application_name = 'dbops-barman-streaming'",
    )
    return int(rows[0][0])


def test_serve_streams_backs_up_exports_metrics_and_stops_streaming(
    cluster: Cluster, tmp_path: Path
) -> None:
    port = free_port()
    env = pitr_env(
        cluster,
        tmp_path / "pitr",
        OPS_LISTEN=f"127.0.0.1:{port}",
        PITR_ARCHIVE_TIMEOUT="2s",
        PITR_CRON_INTERVAL="5s",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: get(port, "/metrics")[0] == 200, 30), "ops serve did not start"
        assert wait_for(lambda: metric(port, "dbops_pitr_base_backups_retained") == 1.0, 180)
        assert wait_for(lambda: metric(port, "dbops_pitr_streaming_up") == 1.0, 60)
        assert metric(port, 'dbops_pitr_slot_status{wal_status="reserved"}') == 1.0
        assert metric(port, 'dbops_pitr_slot_status{wal_status="lost"}') == 0.0
        assert metric(port, "dbops_pitr_slot_max_retained_bytes") == 256 * 1024**2
        assert metric(port, 'dbops_pitr_base_backup_runs_total{result="ok"}') == 1.0
        assert (metric(port, "dbops_pitr_recovery_window_start_timestamp_seconds") or 0) > 0
        assert (metric(port, "dbops_pitr_base_backup_last_size_bytes") or 0) > 1_000_000
        assert metric(port, "dbops_pitr_base_backup_interval_seconds") == 86400.0

        # A write is switched out and archived within PITR_ARCHIVE_TIMEOUT (+ the check delay).
        archived = metric(port, "dbops_pitr_wal_last_archived_timestamp_seconds") or 0.0
        execute(cluster.url(), "CREATE TABLE IF NOT EXISTS t AS SELECT 1 AS one")
        assert wait_for(
            lambda: (
                (metric(port, "dbops_pitr_wal_switches_total") or 0) >= 1
                and (metric(port, "dbops_pitr_wal_last_archived_timestamp_seconds") or 0) > archived
            ),
            30,
            0.5,
        )
        status, body = get(port, "/healthz")
        assert status == 200, body

        promtool = shutil.which("promtool")
        assert promtool is not None, "promtool missing: install Debian's prometheus package"
        scraped = get(port, "/metrics")[1]
        exported = {line.split("{")[0].split(" ")[0] for line in scraped.splitlines()}
        read_by_rules = [n for n in rule_metrics() if n.startswith("dbops_pitr_")]
        assert len(read_by_rules) >= 6
        # the last drill's result exists once a drill has run (tests/unit/test_pitr_metrics.py)
        after_a_drill = {"dbops_pitr_drill_last_ok"}
        assert [n for n in read_by_rules if n not in exported | after_a_drill] == []
        pitr_lines = "".join(line + "\n" for line in scraped.splitlines() if "dbops_pitr_" in line)
        check = subprocess.run(
            [promtool, "check", "metrics"], input=pitr_lines, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-2000:]
    assert wait_for(lambda: streamers(cluster) == 0, 20), "receive-wal outlived the sidecar"
