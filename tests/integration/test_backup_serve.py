"""``ops serve`` with backups, as a process: the catch-up run at start shows on /metrics, and
/healthz fails while the newest good backup is older than BACKUP_MAX_AGE."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import URL

from ops.backup.manifest import BackupDirectory, format_time
from ops.backup.runner import run_backup
from tests.conftest import env_for
from tests.integration.backup_helpers import REPO, populate, settings_for
from tests.pgcluster import free_port, wait_for


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


@contextmanager
def serving(url: URL, directory: Path, **extra: str) -> Iterator[int]:
    port = free_port()
    env = env_for(
        url,
        BACKUP_DIR=str(directory),
        OPS_LISTEN=f"127.0.0.1:{port}",
        BACKUP_SCHEDULE="0 3 * * *",
        **extra,
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
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        assert process.returncode == 0, stderr[-2000:]


def metric(port: int, line_start: str) -> float | None:
    for line in get(port, "/metrics")[1].splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_serve_backs_up_at_start_and_exports_backup_metrics(
    migrated_db: URL, tmp_path: Path
) -> None:
    populate(migrated_db, rows=100)
    with serving(migrated_db, tmp_path) as port:
        assert wait_for(lambda: metric(port, 'dbops_backup_runs_total{result="ok"}') == 1.0, 60)
        assert metric(port, "dbops_backup_retained") == 1.0
        assert (metric(port, "dbops_backup_last_success_timestamp_seconds") or 0) > 0
        assert (metric(port, "dbops_backup_last_size_bytes") or 0) > 0
        next_run = metric(port, "dbops_backup_next_run_timestamp_seconds")
        assert next_run is not None
        assert datetime.fromtimestamp(next_run, UTC).strftime("%H:%M") == "03:00"
        assert metric(port, "dbops_backup_max_age_seconds") == 26 * 3600
        status, body = get(port, "/healthz")
        assert status == 200, body
    assert len(BackupDirectory(tmp_path).backups(str(migrated_db.database))) == 1


def test_serve_healthz_fails_when_newest_backup_is_older_than_max_age(
    migrated_db: URL, tmp_path: Path
) -> None:
    settings = settings_for(migrated_db, tmp_path)
    store = BackupDirectory(tmp_path)
    manifest = run_backup(settings)
    # Two hours old: younger than the daily schedule (no catch-up), older than BACKUP_MAX_AGE.
    then = datetime.now(UTC) - timedelta(hours=2)
    manifest.started_at = format_time(then - timedelta(seconds=3)) or ""
    manifest.finished_at = format_time(then)
    store.write(manifest)
    with serving(migrated_db, tmp_path, BACKUP_MAX_AGE="1h") as port:
        status, body = get(port, "/healthz")
        assert status == 503
        problems = json.loads(body)["problems"]
        assert any(manifest.id in p and "BACKUP_MAX_AGE" in p for p in problems), problems
        assert metric(port, 'dbops_backup_runs_total{result="ok"}') == 0.0
    fresh = run_backup(settings)
    assert fresh.ok
    with serving(migrated_db, tmp_path, BACKUP_MAX_AGE="1h") as port:
        status, body = get(port, "/healthz")
        assert status == 200, body


def test_serve_with_an_invalid_backup_schedule_exits_2_at_start(
    migrated_db: URL, tmp_path: Path
) -> None:
    env = env_for(
        migrated_db,
        BACKUP_DIR=str(tmp_path),
        OPS_LISTEN=f"127.0.0.1:{free_port()}",
        BACKUP_SCHEDULE="0 3 * *",
        BACKUP_VERIFY_SCHEDULE="30 4 31 2 *",
    )
    done = subprocess.run(
        [sys.executable, "-m", "ops.cli", "serve"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "BACKUP_SCHEDULE '0 3 * *': must be a 5-field cron expression" in done.stderr
    assert "BACKUP_VERIFY_SCHEDULE '30 4 31 2 *': never fires" in done.stderr
    assert list(tmp_path.iterdir()) == []
