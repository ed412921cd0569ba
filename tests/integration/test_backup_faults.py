"""Backups under faults: a killed dump connection, a full or read-only directory, two runs at
once, an interrupted CLI run. Real PostgreSQL, bounded in time."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from ops.backup.manifest import STATUS_FAILED, BackupDirectory
from ops.backup.pgtools import OWN_APPLICATION_NAMES
from ops.backup.prune import prune
from ops.backup.runner import BackupError, run_backup
from ops.backup.verify import check
from tests.conftest import Server
from tests.integration.backup_helpers import (
    LOST_AT_FORK,
    cli_run_held_by_lock,
    lost_signal,
    ops,
    pg_dump_processes,
    populate,
    run_held_by_lock,
    settings_for,
    waiting_dump_backend,
)
from tests.pgcluster import wait_for


@pytest.fixture
def source(migrated_db: URL) -> URL:
    populate(migrated_db)
    return migrated_db


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".dbops-tmp-")]


def test_dump_connection_terminated_mid_dump_records_failure_and_next_run_succeeds(
    pg: Server, source: URL, tmp_path: Path
) -> None:
    settings = settings_for(source, tmp_path)
    with run_held_by_lock(source, tmp_path, settings) as held:
        held.pg_dump_pid()
        assert wait_for(lambda: waiting_dump_backend(source), 20)
        assert _leftovers(tmp_path), "the dump should be writing its temporary file"
        backend = waiting_dump_backend(source)
        pg.execute(f"SELECT pg_terminate_backend({backend})")
    assert held.result == [] and len(held.error) == 1
    assert isinstance(held.error[0], BackupError)
    assert "pg_dump failed" in str(held.error[0])
    store = BackupDirectory(tmp_path)
    assert store.backups(str(source.database)) == []
    assert _leftovers(tmp_path) == []
    records = store.manifests()
    assert [(m.status, m.path, m.files) for m in records] == [(STATUS_FAILED, None, {})]
    listed = ops(source, tmp_path, "backup", "list")
    assert records[0].id not in listed.stdout
    again = run_backup(settings)
    assert again.ok and check(settings, again).ok
    # Retention clears the record of the failed run once a newer good backup exists.
    assert prune(settings).failed_records == [records[0].id]
    assert [m.id for m in store.manifests()] == [again.id]


def test_password_reaches_pg_dump_by_environment_never_argv(source: URL, tmp_path: Path) -> None:
    password = str(source.password)
    assert password
    settings = settings_for(source, tmp_path)
    with run_held_by_lock(source, tmp_path, settings) as held:
        pid = held.pg_dump_pid()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert password.encode() not in argv
    assert f"PGPASSWORD={password}".encode() in environ
    assert held.result and held.result[0].ok


def test_two_runs_at_once_one_runs_the_other_reports_the_lock(source: URL, tmp_path: Path) -> None:
    settings = settings_for(source, tmp_path)
    with run_held_by_lock(source, tmp_path, settings) as held:
        held.pg_dump_pid()
        loser = ops(source, tmp_path, "backup", "run")
        assert loser.returncode == 1
        assert "locked by pid" in loser.stderr and "backup run" in loser.stderr
        assert len(pg_dump_processes(tmp_path)) == 1
    assert held.result and held.result[0].ok
    assert [m.id for m in BackupDirectory(tmp_path).backups(str(source.database))] == [
        held.result[0].id
    ]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_backup_directory_fails_clearly_and_keeps_older_backups(
    pg: Server, migrated_db: URL, small_tmpfs: Path
) -> None:
    settings = settings_for(migrated_db, small_tmpfs)
    older = run_backup(settings)  # the empty schema fits in 1 MB
    pg.execute(
        "CREATE TABLE noise AS SELECT g,"
        " decode(string_agg(md5(g::text || r::text), ''), 'hex') AS b"
        " FROM generate_series(1, 400) g, generate_series(1, 200) r GROUP BY g",
        str(migrated_db.database),
    )
    failed = ops(migrated_db, small_tmpfs, "backup", "run")
    assert failed.returncode == 1
    assert "backup failed" in failed.stderr and "No space left on device" in failed.stderr
    assert _leftovers(small_tmpfs) == []
    store = BackupDirectory(small_tmpfs)
    assert [m.id for m in store.backups(str(migrated_db.database))] == [older.id]
    assert check(settings, older).ok


def test_read_only_backup_directory_fails_runs_clearly_and_still_verifies(
    migrated_db: URL, small_tmpfs: Path
) -> None:
    older = run_backup(settings_for(migrated_db, small_tmpfs))
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    failed = ops(migrated_db, small_tmpfs, "backup", "run")
    assert failed.returncode == 1
    assert "not usable" in failed.stderr and "Read-only file system" in failed.stderr
    checked = ops(migrated_db, small_tmpfs, "backup", "verify", older.id)
    assert checked.returncode == 0, checked.stderr
    assert "checksum ok" in checked.stdout
    assert "not recorded in its manifest" in checked.stderr
    drilled = ops(migrated_db, small_tmpfs, "backup", "verify", "--drill")
    assert drilled.returncode == 0, drilled.stderr
    assert f"{older.id} drill ok" in drilled.stdout
    assert "not recorded in its manifest" in drilled.stderr and "Read-only" in drilled.stderr
    assert "Traceback" not in drilled.stderr
    listed = ops(migrated_db, small_tmpfs, "backup", "list")
    assert listed.returncode == 0 and older.id in listed.stdout
    dry = ops(migrated_db, small_tmpfs, "backup", "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_cli_run_leaves_nothing_that_looks_like_a_backup(
    source: URL, tmp_path: Path, signum: int
) -> None:
    with cli_run_held_by_lock(source, tmp_path) as process:
        assert wait_for(lambda: _leftovers(tmp_path), 10)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode != 0
    assert pg_dump_processes(tmp_path) == []
    assert _leftovers(tmp_path) == []
    assert BackupDirectory(tmp_path).backups(str(source.database)) == []
    assert "interrupted" in stderr


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_lost_while_pg_dump_starts_still_stops_the_cli_run(
    source: URL, tmp_path: Path, name: str
) -> None:
    with cli_run_held_by_lock(source, tmp_path, launcher=("-c", lost_signal(name))) as process:
        try:  # it must stop by itself: nobody else signals it
            _, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
    assert LOST_AT_FORK in stderr  # the interrupt really was lost
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert process.returncode == 130, stderr
    assert pg_dump_processes(tmp_path) == []
    assert _leftovers(tmp_path) == []
    assert BackupDirectory(tmp_path).backups(str(source.database)) == []


def test_every_session_of_a_running_backup_is_left_out_of_the_longest_transaction(
    pg: Server, source: URL, tmp_path: Path
) -> None:
    settings = settings_for(source, tmp_path)
    with run_held_by_lock(source, tmp_path, settings):
        assert wait_for(lambda: waiting_dump_backend(source), 20)
        engine = create_engine(source)
        try:
            with engine.connect() as connection:
                holder = connection.execute(
                    text(
                        """SELECT pid FROM pg_locks WHERE relation = 'payload'::regclass
                             AND mode = 'AccessExclusiveLock' AND granted"""
                    )
                ).scalar_one()
                names = connection.execute(
                    text(
                        """SELECT application_name FROM pg_stat_activity
                           WHERE datname = current_database() AND xact_start IS NOT NULL
                             AND pid NOT IN (pg_backend_pid(), :holder)"""
                    ),
                    {"holder": holder},
                ).scalars()
                backup_sessions = sorted(names)
        finally:
            engine.dispose()
    # the run's snapshot session and pg_dump, both inside a transaction while the dump waits
    assert len(backup_sessions) >= 2
    assert set(backup_sessions) <= set(OWN_APPLICATION_NAMES), backup_sessions


def test_row_count_is_cancelled_from_another_connection_not_by_blocking_the_interpreter(
    source: URL, tmp_path: Path
) -> None:
    import threading
    import time

    import psycopg2

    from ops.backup.runner import _cancel_query, connect

    settings = settings_for(source, tmp_path / "backups")
    outcome: list[BaseException | None] = []
    counting = connect(settings)
    try:
        backend = counting.get_backend_pid()

        def long_count() -> None:
            try:
                with counting.cursor() as cursor:
                    cursor.execute("SELECT pg_sleep(60)")
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=long_count, daemon=True)
        worker.start()
        engine = create_engine(source)
        with engine.connect() as watcher:
            assert wait_for(
                lambda: (
                    watcher.execute(
                        text("SELECT state FROM pg_stat_activity WHERE pid = :pid"),
                        {"pid": backend},
                    ).scalar()
                    == "active"
                ),
                10,
            )
        engine.dispose()
        started = time.monotonic()
        _cancel_query(settings, backend)
        worker.join(15)
        assert not worker.is_alive(), "the count was not cancelled"
        assert time.monotonic() - started < 15
    finally:
        counting.close()
    assert isinstance(outcome[0], psycopg2.errors.QueryCanceled)
    assert "canceling statement due to user request" in str(outcome[0])
