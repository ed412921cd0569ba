"""Hostile and unusual backup directories against the real server and the real CLI: planted
paths and links, malformed manifests, clocks in the future, prune racing a restore, unusable
directories, and a ``kill -9`` mid-dump.

Each case proves that nothing outside ``BACKUP_DIR`` changed (sentinels compared byte for
byte) and that an error is one clear line with the exit code README gives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from ops.backup.lock import RUN_LOCK, reading
from ops.backup.manifest import BackupDirectory, Manifest
from ops.backup.runner import run_backup
from ops.backup.service import BackupService
from tests.conftest import Server, env_for
from tests.integration.backup_helpers import (
    REPO,
    cli_run_held_by_lock,
    data_only_dump,
    ops,
    pg_dump_processes,
    populate,
    settings_for,
)
from tests.integration.test_backup_serve import get, metric, serving
from tests.pgcluster import wait_for
from tests.sentinels import snapshot

KEEP_ONE = {
    "BACKUP_KEEP_LAST": "1",
    "BACKUP_KEEP_DAILY": "0",
    "BACKUP_KEEP_WEEKLY": "0",
    "BACKUP_KEEP_MONTHLY": "0",
}


@pytest.fixture
def source(migrated_db: URL) -> URL:
    populate(migrated_db)
    return migrated_db


def one_line(done: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """The command failed with ``code`` and said so in exactly one line, no traceback (log
    warnings about other files of the directory may precede it)."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.strip().splitlines() if " WARNING " not in line]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def copy_as(directory: Path, real: Manifest, new_id: str, **fields: object) -> Path:
    """A copy of a real backup under another id (its dump too), with ``fields`` overridden."""
    shutil.copyfile(directory / f"{real.id}.dump", directory / f"{new_id}.dump")
    data = json.loads((directory / f"{real.id}.json").read_text())
    data["files"] = {f"{new_id}.dump": data["files"][f"{real.id}.dump"]}
    data.update(id=new_id, path=f"{new_id}.dump")
    data["started_at"] = datetime.strptime(new_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    data["started_at"] = data["started_at"].isoformat()
    data["finished_at"] = data["started_at"]
    data.update(fields)
    path = directory / f"{new_id}.json"
    path.write_text(json.dumps(data))
    return path


def databases(pg: Server) -> set[str]:
    engine = pg.admin_engine()
    try:
        with engine.connect() as connection:
            return set(connection.execute(text("SELECT datname FROM pg_database")).scalars())
    finally:
        engine.dispose()


def test_manifest_paths_outside_the_directory_are_never_followed_by_prune_verify_or_restore(
    pg: Server, source: URL, backups: Path, outside: Path
) -> None:
    real = run_backup(settings_for(source, backups))
    hostile = {
        "20200101T000000Z-aaaaa1": {"path": "../outside/secret.dump"},
        "20200101T000000Z-aaaaa2": {"path": str(outside / "tree")},
        "20200101T000000Z-aaaaa3": {"files": {"../outside/secret.dump": "0" * 64}},
        "20200101T000000Z-aaaaa4": {"path": 42},
    }
    for backup_id, fields in hostile.items():
        copy_as(backups, real, backup_id, **fields)
    linked = "20200101T000000Z-aaaaa5"  # a valid manifest whose dump is a link to elsewhere
    copy_as(backups, real, linked)
    (backups / f"{linked}.dump").unlink()
    os.symlink(outside / "secret.dump", backups / f"{linked}.dump")
    before = set(databases(pg))

    listed = ops(source, backups, "backup", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [row["id"] for row in json.loads(listed.stdout)] == [real.id]
    for backup_id in hostile:
        assert f"{backup_id}.json" in listed.stderr  # one warning each, naming file and field
    assert "field path" in listed.stderr and "field files" in listed.stderr

    for backup_id in [*hostile, linked]:
        verified = ops(source, backups, "backup", "verify", backup_id)
        one_line(verified, 1, "verify failed", backup_id)
        restored = ops(
            source, backups, "backup", "restore", backup_id, "--target-db", "dbops_hostile"
        )
        one_line(restored, 1, "restore failed", backup_id)
    assert "symbolic link" in verified.stderr
    assert databases(pg) == before

    pruned = ops(source, backups, "backup", "prune", **KEEP_ONE)
    assert pruned.returncode == 0, pruned.stderr
    assert "nothing to delete" in pruned.stdout
    # invalid manifests are left for the operator, the good backup works on
    for backup_id in hostile:
        assert (backups / f"{backup_id}.json").exists()
    assert (backups / f"{linked}.dump").is_symlink()
    checked = ops(source, backups, "backup", "verify", real.id)
    assert checked.returncode == 0, checked.stderr


def test_malformed_manifests_leave_list_verify_prune_metrics_and_serve_working(
    source: URL, backups: Path
) -> None:
    real = run_backup(settings_for(source, backups))
    malformed = {
        "20200101T000000Z-bbbbb1": {"path": ["not", "a", "string"]},
        "20200101T000000Z-bbbbb2": {"size_bytes": "large"},
        "20200101T000000Z-bbbbb3": {"id": real.id},
        "20200101T000000Z-bbbbb4": {
            "verifications": [{"kind": "drill", "ok": True, "at": "soon", "duration_seconds": 1}]
        },
    }
    for backup_id, fields in malformed.items():
        copy_as(backups, real, backup_id, **fields)
    (backups / "20200101T000000Z-bbbbb5.json").write_text('{"tool": "dbops", "id": ')

    for args in (("list",), ("list", "--all"), ("verify",), ("prune", "--dry-run"), ("prune",)):
        done = ops(source, backups, "backup", *args)
        assert done.returncode == 0, (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert real.id in ops(source, backups, "backup", "list").stdout

    with serving(source, backups) as port:
        assert metric(port, "dbops_backup_manifests_invalid") == 5.0
        assert metric(port, "dbops_backup_retained") == 1.0
        assert metric(port, "dbops_backup_directory_readable") == 1.0
        status, body = get(port, "/healthz")
        assert status == 200, body


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(
    source: URL, backups: Path, outside: Path
) -> None:
    os.symlink(outside / "passwd", backups / RUN_LOCK)
    done = ops(source, backups, "backup", "run")
    one_line(done, 1, "backup failed", "symbolic link", RUN_LOCK)
    pruned = ops(source, backups, "backup", "prune")
    one_line(pruned, 1, "prune failed", "symbolic link")
    assert BackupDirectory(backups).manifests() == []


def test_a_future_dated_manifest_never_makes_a_run_delete_its_own_backup(
    source: URL, backups: Path
) -> None:
    real = run_backup(settings_for(source, backups))
    future = "20990101T000000Z-fffff1"
    copy_as(backups, real, future)
    done = ops(source, backups, "backup", "run", "--json", **KEEP_ONE)
    assert done.returncode == 0, done.stderr
    taken = json.loads(done.stdout)["backup"]["id"]
    assert json.loads(done.stdout)["pruned"] == [real.id]
    assert f"{future} is dated in the future" in done.stderr
    remaining = [m.id for m in BackupDirectory(backups).backups(str(source.database))]
    assert sorted(remaining) == sorted([taken, future])
    pruned = ops(source, backups, "backup", "prune", "--json", **KEEP_ONE)
    assert json.loads(pruned.stdout)["future_dated"] == [future]
    assert json.loads(pruned.stdout)["deleted"] == []


def _waiting_restore(pg: Server, target: str) -> bool:
    engine = pg.admin_engine()
    try:
        with engine.connect() as connection:
            return bool(
                connection.execute(
                    text(
                        """SELECT count(*) FROM pg_stat_activity
                           WHERE datname = :target AND application_name = 'dbops-restore'
                             AND wait_event_type = 'Lock'"""
                    ),
                    {"target": target},
                ).scalar()
            )
    finally:
        engine.dispose()


def test_prune_keeps_a_backup_a_restore_is_reading_and_the_restore_completes(
    pg: Server, source: URL, backups: Path
) -> None:
    settings = settings_for(source, backups)
    older = run_backup(settings)
    newer = run_backup(settings)
    target = pg.create_database()
    # An uncommitted CREATE SCHEMA in the (empty) target holds pg_restore at its own CREATE
    # SCHEMA: the restore is mid-flight, reading the archive, for as long as we like.
    blocker_engine = create_engine(pg.url(target))
    blocker = blocker_engine.connect()
    blocker.execute(text('CREATE SCHEMA "Odd Schema"'))
    restore = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "backup", "restore", older.id, "--target-db", target],
        env=env_for(source, BACKUP_DIR=str(backups)),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: _waiting_restore(pg, target), 30), "restore never started"
        pruned = ops(source, backups, "backup", "prune", **KEEP_ONE)
        assert pruned.returncode == 0, pruned.stderr
        assert f"kept {older.id} this time: backup {older.id} is being read" in pruned.stdout
        assert (backups / f"{older.id}.dump").exists()
    finally:
        blocker.rollback()
        blocker.close()
        blocker_engine.dispose()
    try:
        _, err = restore.communicate(timeout=120)
        assert restore.returncode == 0, err
        assert data_only_dump(pg.url(target)) == data_only_dump(source)
    finally:
        pg.drop_database(target)
    again = ops(source, backups, "backup", "prune", "--json", **KEEP_ONE)
    assert json.loads(again.stdout)["deleted"] == [older.id]
    assert [m.id for m in BackupDirectory(backups).backups(str(source.database))] == [newer.id]


@pytest.mark.parametrize(
    "args",
    [
        ("list",),
        ("list", "--all", "--json"),
        ("verify",),
        ("verify", "20260101T030000Z-aaaaaa", "--drill"),
        ("prune",),
        ("prune", "--dry-run"),
        ("restore", "20260101T030000Z-aaaaaa", "--target-db", "dbops_never_made"),
    ],
    ids=lambda args: "-".join(a.strip("-") for a in args if not a[0].isdigit()),
)
def test_a_missing_or_non_directory_backup_dir_is_one_line_and_exit_1(
    pg: Server, source: URL, tmp_path: Path, args: tuple[str, ...]
) -> None:
    before = databases(pg)
    missing = tmp_path / "misspelled"
    done = ops(source, missing, "backup", *args)
    one_line(done, 1, f"BACKUP_DIR {missing}: does not exist")
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stdout == ""
    assert not missing.exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    done = ops(source, a_file, "backup", *args)
    one_line(done, 1, f"BACKUP_DIR {a_file}: is not a directory")
    assert a_file.read_text() == "not a directory\n"
    assert databases(pg) == before


def test_an_unreadable_backup_dir_is_one_line_and_exit_1(source: URL, backups: Path) -> None:
    run_backup(settings_for(source, backups))
    before = snapshot(backups)
    mode = backups.stat().st_mode
    backups.chmod(0o000)
    try:
        prefix: list[str] = []
        if os.geteuid() == 0:  # root reads anything: ask as root without that power
            if shutil.which("setpriv") is None:
                pytest.skip("needs setpriv to drop CAP_DAC_OVERRIDE as root")
            prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
        env = env_for(source, BACKUP_DIR=str(backups))
        for args in (("list",), ("verify",), ("prune",), ("prune", "--dry-run")):
            done = subprocess.run(
                [*prefix, sys.executable, "-m", "ops.cli", "backup", *args],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
            one_line(done, 1, f"BACKUP_DIR {backups}: permission denied")
    finally:
        backups.chmod(mode)
    assert snapshot(backups) == before


def test_serve_answers_metrics_when_backup_dir_is_unusable(source: URL, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    with serving(source, a_file) as port:
        assert metric(port, "dbops_backup_directory_readable") == 0.0
        assert metric(port, "dbops_backup_retained") == 0.0
        status, body = get(port, "/healthz")
        assert status == 503 and "is not a directory" in body, body
    assert a_file.read_text() == "not a directory\n"


def _lock_fds(pid: int) -> list[str]:
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found.append(os.readlink(fd))
        except OSError:
            continue
    return [target for target in found if target.endswith(RUN_LOCK)]


def test_kill_9_of_a_run_kills_its_pg_dump_and_the_next_run_cleans_up(
    source: URL, backups: Path
) -> None:
    with cli_run_held_by_lock(source, backups, capture=False) as process:
        dump_pid = pg_dump_processes(backups)[0]
        # pg_dump holds the run lock too: even alive on its own it would keep the next run out
        assert _lock_fds(dump_pid) == [str(backups / RUN_LOCK)]
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        assert wait_for(lambda: not pg_dump_processes(backups), 10), "pg_dump outlived its run"
    leftovers = [p.name for p in backups.iterdir() if p.name.startswith(".dbops-tmp-")]
    assert leftovers, "a killed run leaves its temporary file"
    done = ops(source, backups, "backup", "run")
    assert done.returncode == 0, done.stderr
    assert not [p for p in backups.iterdir() if p.name.startswith(".dbops-tmp-")]
    assert len(BackupDirectory(backups).backups(str(source.database))) == 1


def test_prune_skips_a_backup_held_by_a_reader_while_other_readers_share_it(
    source: URL, backups: Path
) -> None:
    settings = settings_for(source, backups)
    older = run_backup(settings)
    run_backup(settings)
    held = threading.Event()
    release = threading.Event()

    def reader() -> None:
        with reading(BackupDirectory(backups), older.id):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert held.wait(10)
        pruned = ops(source, backups, "backup", "prune", "--json", **KEEP_ONE)
        assert json.loads(pruned.stdout)["deleted"] == []
        assert older.id in json.loads(pruned.stdout)["skipped"]
        drilled = ops(source, backups, "backup", "verify", older.id, "--drill")
        assert drilled.returncode == 0, drilled.stderr  # readers share the lock
    finally:
        release.set()
        thread.join(30)


@pytest.mark.parametrize("runner", ["cli", "sidecar"])
def test_a_run_keeps_its_own_backup_when_another_hosts_clock_is_minutes_ahead(
    source: URL, backups: Path, runner: str
) -> None:
    """Within the skew tolerance a manifest dated ahead is trusted, so it is the "newest";
    keep-last-1 would then delete the backup the run just took, were it not protected."""
    settings = settings_for(source, backups, **KEEP_ONE)
    real = run_backup(settings)
    ahead = datetime.now(UTC) + timedelta(minutes=4)
    skewed = f"{ahead:%Y%m%dT%H%M%SZ}-aaaaa9"
    copy_as(backups, real, skewed)
    (backups / f"{real.id}.json").unlink()
    if runner == "cli":
        done = ops(source, backups, "backup", "run", "--json", **KEEP_ONE)
        assert done.returncode == 0, done.stderr
        taken = json.loads(done.stdout)["backup"]["id"]
    else:
        service = BackupService(settings, CollectorRegistry())
        service.backup_job()
        assert service.counters.runs.labels("ok")._value.get() == 1.0
        taken = max(p.name[:-5] for p in backups.glob("*.json") if p.name[:-5] != skewed)
    remaining = {m.id for m in BackupDirectory(backups).backups(str(source.database))}
    assert remaining == {taken, skewed}


@pytest.mark.parametrize(
    "hostile_id", ["../outside/passwd", "/etc/passwd", "20260101T030000Z-aaaaaa/../../x", "-h"]
)
def test_a_hostile_backup_id_on_the_command_line_is_one_line_and_touches_nothing(
    pg: Server, source: URL, backups: Path, outside: Path, hostile_id: str
) -> None:
    real = run_backup(settings_for(source, backups))
    before, dbs = snapshot(backups), databases(pg)
    verified = ops(source, backups, "backup", "verify", "--", hostile_id)
    one_line(verified, 1, "verify failed")
    restored = ops(source, backups, "backup", "restore", "--target-db", "x", "--", hostile_id)
    one_line(restored, 1, "restore failed")
    assert snapshot(backups) == before and databases(pg) == dbs
    assert ops(source, backups, "backup", "verify", real.id).returncode == 0


def test_links_planted_at_a_runs_own_names_are_replaced_never_written_through(
    source: URL, backups: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backup_id = "20260101T030000Z-abcdef"
    monkeypatch.setattr("ops.backup.runner.new_backup_id", lambda now=None: backup_id)
    os.symlink(outside / "tree", backups / f".dbops-tmp-{backup_id}")
    os.symlink(outside / "secret.dump", backups / f"{backup_id}.dump")
    os.symlink(outside / "passwd", backups / f"{backup_id}.json")
    manifest = run_backup(settings_for(source, backups))
    assert manifest.ok and manifest.id == backup_id
    for name in (f"{backup_id}.dump", f"{backup_id}.json"):
        assert not (backups / name).is_symlink()
    assert not (backups / f".dbops-tmp-{backup_id}").exists()
    assert ops(source, backups, "backup", "verify", backup_id).returncode == 0
