"""``ops serve`` with PITR and OFFSITE_S3_URL, as a process: its worker ships WAL and the first
base backup to a real S3 server by itself, exports every ``dbops_offsite_*`` name the rules
read (accepted by promtool), says the store's state in ``/readyz``, and ``ops pitr check``
names a wrong key in one line."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import run_ops
from tests.integration.pitr_helpers import REPO, execute, pitr_env
from tests.integration.test_backup_serve import get, metric
from tests.monitoring.tools import rule_metrics
from tests.objectstore import ObjectStore
from tests.pgcluster import Cluster, free_port, wait_for


def test_serve_ships_to_the_store_and_exports_every_offsite_metric_the_rules_read(
    cluster: Cluster,
    tmp_path: Path,
    object_store: ObjectStore,
    bucket: str,
) -> None:
    port = free_port()
    env = pitr_env(
        cluster,
        tmp_path / "pitr",
        OPS_LISTEN=f"127.0.0.1:{port}",
        PITR_ARCHIVE_TIMEOUT="2s",
        PITR_CRON_INTERVAL="5s",
        OFFSITE_DIR=str(tmp_path / "offsite"),
        **object_store.env(bucket, "serve"),
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
        assert wait_for(
            lambda: (
                (metric(port, "dbops_offsite_basebackup_last_shipped_timestamp_seconds") or 0) > 0
            ),
            180,
        )
        execute(cluster.url(), "CREATE TABLE IF NOT EXISTS t AS SELECT 1 AS one")
        shipped = metric(port, "dbops_offsite_wal_last_shipped_timestamp_seconds") or 0
        assert wait_for(
            lambda: (
                (metric(port, "dbops_offsite_wal_last_shipped_timestamp_seconds") or 0) > shipped
            ),
            60,
            0.5,
        )
        keys = object_store.keys(bucket, "serve/dbops/")
        assert any(
            key.startswith("serve/dbops/base/") and key.endswith("/backup.info") for key in keys
        )
        assert any(key.startswith("serve/dbops/wals/") and key.endswith(".gz") for key in keys)
        assert metric(port, "dbops_offsite_store_up") == 1.0
        assert metric(port, "dbops_offsite_wal_lag_segments") is not None

        # (this cluster has no schema, so /readyz is 503; the store's part of it is what counts)
        readiness = json.loads(get(port, "/readyz")[1])
        assert readiness["offsite"]["ok"] is True, readiness
        assert readiness["offsite"]["shipping"] is True

        promtool = shutil.which("promtool")
        assert promtool is not None, "promtool missing: install Debian's prometheus package"
        scraped = get(port, "/metrics")[1]
        exported = {line.split("{")[0].split(" ")[0] for line in scraped.splitlines()}
        read_by_rules = [n for n in rule_metrics() if n.startswith("dbops_offsite_")]
        assert len(read_by_rules) >= 4
        # gaps appear after the first listing of the store (every 5 minutes, and after a
        # shipped base backup): wait for it rather than assume it.
        assert wait_for(lambda: metric(port, "dbops_offsite_wal_gaps") == 0.0, 60)
        scraped = get(port, "/metrics")[1]
        exported = {line.split("{")[0].split(" ")[0] for line in scraped.splitlines()}
        assert [n for n in read_by_rules if n not in exported] == []
        for name in (
            "dbops_offsite_wal_lag_seconds",
            "dbops_offsite_recovery_window_start_timestamp_seconds",
            "dbops_offsite_queue_bytes",
            "dbops_offsite_upload_failures_total",
        ):
            assert name in exported, name
        offsite_lines = "".join(
            line + "\n" for line in scraped.splitlines() if "dbops_offsite_" in line
        )
        check = subprocess.run(
            [promtool, "check", "metrics"], input=offsite_lines, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert object_store.secret_access_key not in scraped
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    assert object_store.secret_access_key not in stderr
    assert "Traceback" not in stderr

    # `ops pitr status` shows the store's side: what was shipped, nothing missing.
    result = run_ops("pitr", "status", "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    offsite = json.loads(result.stdout)["offsite"]
    assert offsite["store_ok"] is True and offsite["gaps"] == []
    assert offsite["last_shipped_wal"] and offsite["last_shipped_backup"]
    assert (offsite["window_start"] or 0) > 0
    text = run_ops("pitr", "status", env=env)
    assert "Last WAL shipped:" in text.stdout and "Off-host queue:" in text.stdout

    # A wrong key: `ops pitr check` fails with the store's own one-line reason.
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-right-secret"}
    result = run_ops("pitr", "check", env=wrong)
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("dbops_offsite_store"))
    assert "FAILED" in line and "refused the credentials" in line
    assert "not-the-right-secret" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
