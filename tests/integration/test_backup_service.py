"""The sidecar's backup component on a real scheduler and a real PostgreSQL: catch-up at start,
metrics from the manifests, staleness in health, lock contention, shutdown mid-dump."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from ops.backup.lock import DirectoryLock
from ops.backup.manifest import BackupDirectory, format_time
from ops.backup.runner import run_backup
from ops.backup.service import BACKUP_JOB, MAX_RETRIES, RETRY_JOB, BackupService
from ops.settings import Settings
from tests.integration.backup_helpers import populate, settings_for
from tests.pgcluster import free_port, wait_for


@pytest.fixture
def source(migrated_db: URL) -> URL:
    populate(migrated_db, rows=200)
    return migrated_db


@pytest.fixture
def scheduler() -> Iterator[BackgroundScheduler]:
    scheduler = BackgroundScheduler(timezone=UTC)
    yield scheduler
    if scheduler.running:
        scheduler.shutdown(wait=True)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels or None)


def test_service_backs_up_at_once_when_no_recent_backup_and_exports_metrics(
    source: URL, tmp_path: Path, scheduler: BackgroundScheduler
) -> None:
    settings = settings_for(source, tmp_path, BACKUP_SCHEDULE="0 3 * * *")
    registry = CollectorRegistry()
    service = BackupService(settings, registry)
    assert sample(registry, "dbops_backup_last_success_timestamp_seconds") == 0.0
    service.start(scheduler)
    scheduler.start()
    store = BackupDirectory(tmp_path)
    assert wait_for(lambda: store.backups(str(source.database)), 60)
    assert wait_for(lambda: sample(registry, "dbops_backup_runs_total", result="ok") == 1.0, 10)
    newest = store.backups(str(source.database))[-1]
    finished = newest.finished
    assert finished is not None
    assert sample(registry, "dbops_backup_last_success_timestamp_seconds") == pytest.approx(
        finished.timestamp()
    )
    assert sample(registry, "dbops_backup_last_size_bytes") == newest.size_bytes
    assert sample(registry, "dbops_backup_retained") == 1.0
    assert sample(registry, "dbops_backup_in_progress") == 0.0
    assert sample(registry, "dbops_backup_max_age_seconds") == settings.backup.max_age
    assert sample(registry, "dbops_backup_runs_total", result="failed") == 0.0
    next_run = sample(registry, "dbops_backup_next_run_timestamp_seconds")
    assert next_run is not None
    assert datetime.fromtimestamp(next_run, UTC).strftime("%H:%M") == "03:00"
    assert service.health_problems() == []
    # A backup taken by the CLI shows up too: metrics come from the manifests.
    cli_backup = run_backup(settings)
    assert sample(registry, "dbops_backup_retained") == 2.0
    cli_finished = cli_backup.finished
    assert cli_finished is not None
    assert sample(registry, "dbops_backup_last_success_timestamp_seconds") == pytest.approx(
        cli_finished.timestamp()
    )


def test_service_waits_for_the_schedule_when_the_newest_backup_is_recent(
    source: URL, tmp_path: Path, scheduler: BackgroundScheduler
) -> None:
    settings = settings_for(source, tmp_path, BACKUP_SCHEDULE="0 3 * * *")
    run_backup(settings)
    service = BackupService(settings, CollectorRegistry())
    service.start(scheduler)
    scheduler.start()
    job = scheduler.get_job(BACKUP_JOB)
    assert job is not None
    assert (job.next_run_time.hour, job.next_run_time.minute) == (3, 0)
    assert job.max_instances == 1 and job.coalesce and job.misfire_grace_time == 3600


def newest_id(settings: Settings) -> str:
    return BackupDirectory(settings.backup.directory).backups(settings.db.database)[-1].id


def _age_newest(settings: Settings, hours: float) -> None:
    store = BackupDirectory(settings.backup.directory)
    newest = store.backups(settings.db.database)[-1]
    then = datetime.now(UTC) - timedelta(hours=hours)
    newest.started_at = format_time(then - timedelta(seconds=5)) or ""
    newest.finished_at = format_time(then)
    store.write(newest)


def test_health_fails_when_newest_good_backup_is_older_than_max_age(
    source: URL, tmp_path: Path
) -> None:
    settings = settings_for(source, tmp_path, BACKUP_MAX_AGE="1h")
    service = BackupService(settings, CollectorRegistry())
    run_backup(settings)
    assert service.health_problems() == []
    _age_newest(settings, hours=2)
    problems = service.health_problems()
    assert len(problems) == 1
    assert problems[0].startswith(f"backup: newest good backup {newest_id(settings)} is 7")
    assert "BACKUP_MAX_AGE 3600s" in problems[0]


def test_scheduled_run_counts_locked_when_another_run_holds_the_directory(
    source: URL, tmp_path: Path
) -> None:
    settings = settings_for(source, tmp_path)
    registry = CollectorRegistry()
    service = BackupService(settings, registry)
    tmp_path.mkdir(exist_ok=True)
    with DirectoryLock(tmp_path, purpose="ops backup run"):
        service.backup_job()
    assert sample(registry, "dbops_backup_runs_total", result="locked") == 1.0
    assert BackupDirectory(tmp_path).manifests() == []


def test_stopping_the_service_mid_dump_cancels_and_cleans_up(source: URL, tmp_path: Path) -> None:
    settings = settings_for(source, tmp_path)
    registry = CollectorRegistry()
    service = BackupService(settings, registry)
    engine = create_engine(source)
    connection = engine.connect()
    connection.execute(text("LOCK TABLE payload IN ACCESS EXCLUSIVE MODE"))
    job = threading.Thread(target=service.backup_job)
    try:
        job.start()
        assert wait_for(lambda: sample(registry, "dbops_backup_in_progress") == 1.0, 10)
        assert wait_for(
            lambda: any(p.name.startswith(".dbops-tmp-") for p in tmp_path.iterdir()), 20
        )
        service.stop()
        job.join(30)
        assert not job.is_alive()
    finally:
        connection.rollback()
        connection.close()
        engine.dispose()
    assert sample(registry, "dbops_backup_runs_total", result="failed") == 1.0
    assert sample(registry, "dbops_backup_in_progress") == 0.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dbops-tmp-")] == []
    assert BackupDirectory(tmp_path).backups(str(source.database)) == []


def test_scheduled_drill_records_its_result_in_manifest_and_metrics(
    source: URL, tmp_path: Path
) -> None:
    settings = settings_for(source, tmp_path)
    registry = CollectorRegistry()
    service = BackupService(settings, registry)
    service.verify_job()  # nothing to drill yet: counted as a failure, not a crash
    assert sample(registry, "dbops_backup_verify_runs_total", result="failed") == 1.0
    manifest = run_backup(settings)
    service.verify_job()
    assert sample(registry, "dbops_backup_verify_runs_total", result="ok") == 1.0
    recorded = BackupDirectory(tmp_path).get(manifest.id)
    assert recorded is not None and recorded.verified
    drilled = recorded.last_success("drill")
    assert drilled is not None
    assert sample(registry, "dbops_backup_verify_last_success_timestamp_seconds") == pytest.approx(
        drilled.timestamp()
    )


def test_failed_run_is_retried_a_few_times_then_left_to_the_schedule(tmp_path: Path) -> None:
    nowhere = URL.create(
        "postgresql+psycopg2",
        username="u",
        password="p",
        host="127.0.0.1",
        port=free_port(),
        database="gone",
    )
    settings = settings_for(nowhere, tmp_path, DB_CONNECT_TIMEOUT="1")
    registry = CollectorRegistry()
    service = BackupService(settings, registry)
    scheduler = BackgroundScheduler(timezone=UTC)  # never started: jobs only get planned
    service.start(scheduler)
    before = datetime.now(UTC)
    service.backup_job()
    retry = scheduler.get_job(RETRY_JOB)
    assert retry is not None
    assert timedelta(minutes=9) < retry.trigger.run_date - before < timedelta(minutes=11)
    for _ in range(MAX_RETRIES + 2):
        if scheduler.get_job(RETRY_JOB) is not None:
            scheduler.remove_job(RETRY_JOB)  # as if it had run
        service.backup_job()
    assert sample(registry, "dbops_backup_runs_total", result="failed") == MAX_RETRIES + 3
    assert scheduler.get_job(RETRY_JOB) is None  # retries used up: the cron schedule remains
    assert scheduler.get_job(BACKUP_JOB) is not None
    failed = BackupDirectory(tmp_path).manifests()
    assert failed and all(not m.ok and "database error" in (m.error or "") for m in failed)
