"""Backups against a real PostgreSQL: run, list, verify, drill, restore, retention, via the CLI
where exit codes and messages are the behaviour."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from ops.backup.manifest import BackupDirectory
from ops.backup.prune import prune
from ops.backup.runner import run_backup
from ops.backup.verify import SCRATCH_PREFIX, DrillCancelled, drill, scratch_database
from tests.conftest import Server, env_for
from tests.integration.backup_helpers import REPO, data_only_dump, ops, populate, settings_for


@pytest.fixture
def source(migrated_db: URL) -> URL:
    populate(migrated_db)
    return migrated_db


def test_row_counts_take_table_names_with_percent_signs_as_names(
    source: URL, tmp_path: Path
) -> None:
    engine = create_engine(source)
    with engine.begin() as connection:
        connection.execute(text('CREATE TABLE "100%s %% done" (k int)'))
        connection.execute(text('INSERT INTO "100%s %% done" VALUES (1), (2), (3)'))
    engine.dispose()

    manifest = run_backup(settings_for(source, tmp_path))

    assert manifest.tables["public.100%s %% done"] == 3


def test_backup_run_writes_dump_and_manifest_with_snapshot_row_counts(
    source: URL, tmp_path: Path
) -> None:
    done = ops(source, tmp_path, "backup", "run", "--json")
    assert done.returncode == 0, done.stderr
    backup = json.loads(done.stdout)["backup"]
    manifest = BackupDirectory(tmp_path).get(backup["id"])
    assert manifest is not None and manifest.ok
    assert manifest.tables["public.payload"] == 2000
    assert manifest.tables["Odd Schema.Mixed Case"] == 50
    assert manifest.tables["public.alembic_version"] == 1
    assert list(manifest.files) == [f"{manifest.id}.dump"]
    assert manifest.size_bytes == (tmp_path / f"{manifest.id}.dump").stat().st_size
    assert manifest.server_version and manifest.server_version.startswith("PostgreSQL ")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".dbops-")) == [
        f"{manifest.id}.dump",
        f"{manifest.id}.json",
    ]
    listed = json.loads(ops(source, tmp_path, "backup", "list", "--json").stdout)
    assert [(b["id"], b["status"], b["size_bytes"]) for b in listed] == [
        (manifest.id, "ok", manifest.size_bytes)
    ]


def test_restore_into_a_fresh_database_reproduces_the_data_exactly(
    pg: Server, source: URL, tmp_path: Path
) -> None:
    taken = ops(source, tmp_path, "backup", "run")
    assert taken.returncode == 0
    # the result once, in the unit that fits, not again as a log line
    assert (taken.stdout + taken.stderr).count(" ok: ") == 1, taken.stdout + taken.stderr
    assert re.search(r" ok: \d+(\.\d+)? (kB|MB) in ", taken.stdout), taken.stdout
    backup_id = BackupDirectory(tmp_path).backups(str(source.database))[-1].id
    target = f"{source.database}_restored"
    try:
        done = ops(
            source, tmp_path, "backup", "restore", backup_id, "--target-db", target, "-j", "2"
        )
        assert done.returncode == 0, done.stderr
        assert f"restored {backup_id} into {target}" in done.stdout
        assert data_only_dump(pg.url(target)) == data_only_dump(source)
    finally:
        pg.drop_database(target)


def test_restore_refuses_a_non_empty_target_unless_forced(
    pg: Server, source: URL, tmp_path: Path
) -> None:
    assert ops(source, tmp_path, "backup", "run").returncode == 0
    backup_id = BackupDirectory(tmp_path).backups(str(source.database))[-1].id
    target = pg.create_database()
    try:
        pg.execute("CREATE TABLE precious (x int); INSERT INTO precious VALUES (1)", target)
        refused = ops(source, tmp_path, "backup", "restore", backup_id, "--target-db", target)
        assert refused.returncode == 1
        assert "is not empty" in refused.stderr and "--force" in refused.stderr
        engine = create_engine(pg.url(target))
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM precious")).scalar() == 1
        engine.dispose()
        forced = ops(
            source, tmp_path, "backup", "restore", backup_id, "--target-db", target, "--force"
        )
        assert forced.returncode == 0, forced.stderr
        assert data_only_dump(pg.url(target)) == data_only_dump(source)
        assert f'the database replaced is kept as "{target}_replaced_' in forced.stdout
    finally:
        pg.drop_database(target)
        engine = create_engine(pg.admin_url)
        with engine.connect() as connection:
            kept = connection.execute(
                text("SELECT datname FROM pg_database WHERE datname LIKE :kept"),
                {"kept": f"{target}_replaced_%"},
            ).scalars()
            for name in list(kept):
                pg.drop_database(name)
        engine.dispose()


def test_tampered_backup_fails_verify_and_restore(pg: Server, source: URL, tmp_path: Path) -> None:
    assert ops(source, tmp_path, "backup", "run").returncode == 0
    manifest = BackupDirectory(tmp_path).backups(str(source.database))[-1]
    checked = ops(source, tmp_path, "backup", "verify", manifest.id)
    assert checked.returncode == 0, checked.stderr
    dump = tmp_path / f"{manifest.id}.dump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    tampered = ops(source, tmp_path, "backup", "verify", manifest.id, "--json")
    assert tampered.returncode == 1
    assert "sha256 mismatch" in json.loads(tampered.stdout)["detail"]
    target = f"{source.database}_tampered"
    refused = ops(source, tmp_path, "backup", "restore", manifest.id, "--target-db", target)
    assert refused.returncode == 1 and "damaged" in refused.stderr
    recorded = BackupDirectory(tmp_path).get(manifest.id)
    assert recorded is not None and not recorded.verified
    assert [v.ok for v in recorded.verifications] == [True, False]


def test_restore_of_an_unreadable_archive_fails_cleanly_and_creates_no_database(
    pg: Server, source: URL, tmp_path: Path
) -> None:
    assert ops(source, tmp_path, "backup", "run").returncode == 0
    manifest = BackupDirectory(tmp_path).backups(str(source.database))[-1]
    dump = tmp_path / f"{manifest.id}.dump"
    dump.write_bytes(b"not an archive, but checksummed as if it were one\n" * 100)
    manifest_file = tmp_path / f"{manifest.id}.json"
    recorded = json.loads(manifest_file.read_text())
    recorded["files"] = {dump.name: hashlib.sha256(dump.read_bytes()).hexdigest()}
    manifest_file.write_text(json.dumps(recorded))
    target = f"{source.database}_unreadable"
    refused = ops(source, tmp_path, "backup", "restore", manifest.id, "--target-db", target)
    assert refused.returncode == 1
    assert "cannot read backup" in refused.stderr and "Traceback" not in refused.stderr
    engine = create_engine(source)
    try:
        with engine.connect() as connection:
            exists = connection.execute(
                text("SELECT count(*) FROM pg_database WHERE datname = :name"), {"name": target}
            ).scalar_one()
    finally:
        engine.dispose()
    assert exists == 0


def test_prune_of_a_missing_backup_directory_fails_cleanly(source: URL, tmp_path: Path) -> None:
    missing = tmp_path / "never-created"
    for args in (("backup", "prune"), ("backup", "prune", "--dry-run")):
        result = ops(source, missing, *args)
        assert result.returncode in (0, 1), result.stderr
        assert "Traceback" not in result.stderr
    result = ops(source, missing, "backup", "prune")
    assert result.returncode == 1 and "never-created" in result.stderr


def test_restore_drill_matches_dump_time_counts_and_drops_its_scratch_database(
    pg: Server, source: URL, tmp_path: Path
) -> None:
    settings = settings_for(source, tmp_path)
    manifest = run_backup(settings)
    # Rows written after the snapshot are not in the dump; the drill must not care.
    pg.execute(
        "INSERT INTO payload (label) SELECT 'later' FROM generate_series(1, 10)",
        str(source.database),
    )
    verification = drill(settings, manifest)
    assert verification.ok, verification.detail
    assert "rows match the dump-time counts" in verification.detail
    # A manifest that disagrees with the archive must make the drill fail.
    store = BackupDirectory(tmp_path)
    wrong = store.get(manifest.id)
    assert wrong is not None
    wrong.tables["public.payload"] += 1
    store.write(wrong)
    failed = drill(settings, wrong)
    assert not failed.ok
    assert "public.payload: 2000 rows restored, 2001 at dump time" in failed.detail
    engine = create_engine(pg.admin_url)
    with engine.connect() as connection:
        leftovers = connection.execute(
            text("SELECT datname FROM pg_database WHERE datname LIKE :p"),
            {"p": SCRATCH_PREFIX + "%"},
        ).all()
    engine.dispose()
    assert leftovers == []
    recorded = store.get(manifest.id)
    assert recorded is not None
    assert [(v.kind, v.ok) for v in recorded.verifications] == [("drill", True), ("drill", False)]


def test_directory_format_with_parallel_jobs_round_trips(
    pg: Server, source: URL, tmp_path: Path
) -> None:
    settings = settings_for(source, tmp_path, BACKUP_FORMAT="directory", BACKUP_JOBS="2")
    manifest = run_backup(settings)
    assert manifest.path == f"{manifest.id}.dir"
    assert "toc.dat" in manifest.files and len(manifest.files) > 3
    assert drill(settings, manifest).ok


@pytest.mark.parametrize("backup_format", ["custom", "directory"])
def test_backups_and_manifests_are_readable_by_their_owner_only(
    pg: Server, source: URL, tmp_path: Path, backup_format: str
) -> None:
    directory = tmp_path / "backups"
    manifest = run_backup(settings_for(source, directory, BACKUP_FORMAT=backup_format))
    assert manifest.path is not None
    written = [directory, *directory.rglob("*")]
    assert directory / manifest.path in written and directory / f"{manifest.id}.json" in written
    modes = {str(path.relative_to(tmp_path)): oct(path.stat().st_mode & 0o777) for path in written}
    expected = {name: "0o700" if (tmp_path / name).is_dir() else "0o600" for name in modes}
    assert modes == expected


def test_retention_deletes_only_our_backups_and_keeps_newest_verified(
    pg: Server, source: URL, tmp_path: Path
) -> None:
    other = pg.create_database()
    try:
        foreign = [tmp_path / "notes.txt", tmp_path / "manual.dump", tmp_path / "x.json"]
        for path in foreign:
            path.write_text("not ours")
        other_backup = run_backup(settings_for(pg.url(other), tmp_path))
        settings = settings_for(
            source,
            tmp_path,
            BACKUP_KEEP_LAST="1",
            BACKUP_KEEP_DAILY="0",
            BACKUP_KEEP_WEEKLY="0",
            BACKUP_KEEP_MONTHLY="0",
        )
        verified = run_backup(settings)
        assert drill(settings, verified).ok
        middle = run_backup(settings)
        newest = run_backup(settings)

        dry = ops(source, tmp_path, "backup", "prune", "--dry-run", **_keep_one())
        assert dry.returncode == 0, dry.stderr
        assert f"would delete {middle.id}" in dry.stdout
        assert f"keep {verified.id}: newest verified backup" in dry.stdout
        assert (tmp_path / f"{middle.id}.dump").exists()

        result = prune(settings)
        assert result.deleted == [middle.id]
        remaining = [m.id for m in BackupDirectory(tmp_path).backups(str(source.database))]
        assert remaining == [verified.id, newest.id]
        assert not (tmp_path / f"{middle.id}.dump").exists()
        assert not (tmp_path / f"{middle.id}.json").exists()
        assert all(path.read_text() == "not ours" for path in foreign)
        assert (tmp_path / f"{other_backup.id}.dump").exists()
    finally:
        pg.drop_database(other)


def _keep_one() -> dict[str, str]:
    return {
        "BACKUP_KEEP_LAST": "1",
        "BACKUP_KEEP_DAILY": "0",
        "BACKUP_KEEP_WEEKLY": "0",
        "BACKUP_KEEP_MONTHLY": "0",
    }


def test_pg_dump_older_than_the_server_is_refused_naming_both(source: URL, tmp_path: Path) -> None:
    bindir = tmp_path / "oldbin"
    bindir.mkdir()
    fake = bindir / "pg_dump"
    fake.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 12.22'\n")
    fake.chmod(0o755)
    backups = tmp_path / "backups"
    done = ops(source, backups, "backup", "run", PG_BINDIR=str(bindir))
    assert done.returncode == 1
    assert "pg_dump 12" in done.stderr and "server" in done.stderr and "PostgreSQL 1" in done.stderr
    assert BackupDirectory(backups).backups(str(source.database)) == []


def test_invalid_backup_schedule_exits_2_before_connecting(tmp_path: Path, source: URL) -> None:
    done = ops(source, tmp_path, "backup", "run", BACKUP_SCHEDULE="61 * * * *")
    assert done.returncode == 2
    assert "BACKUP_SCHEDULE" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def backup_role(pg: Server) -> Iterator[tuple[str, str]]:
    """A role shaped like BACKUP_DB_USER: reads everything, may create databases, nothing else."""
    name, password = f"t_backup_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    pg.execute(
        f"CREATE ROLE {name} LOGIN PASSWORD '{password}' CREATEDB "
        "IN ROLE pg_read_all_data, pg_monitor"
    )
    try:
        yield name, password
    finally:
        pg.execute(f"DROP ROLE IF EXISTS {name}")


def test_backup_role_without_superuser_can_run_drill_and_restore(
    pg: Server, source: URL, tmp_path: Path, backup_role: tuple[str, str]
) -> None:
    user, password = backup_role
    # What the stack's database holds and only a superuser may restore: an untrusted extension
    # (with its comment) and default privileges of another role.
    pg.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", database=source.database)
    pg.execute(
        "ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public "
        "GRANT SELECT ON TABLES TO pg_monitor",
        database=source.database,
    )
    as_role = source.set(username=user, password=password)
    settings = settings_for(as_role, tmp_path)
    manifest = run_backup(settings)
    assert manifest.tables["public.payload"] == 2000
    verification = drill(settings, manifest)
    assert verification.ok, verification.detail
    target = f"{source.database}_by_role"
    try:
        done = ops(as_role, tmp_path, "backup", "restore", manifest.id, "--target-db", target)
        assert done.returncode == 0, done.stderr
        assert "EXTENSION - pg_stat_statements" in done.stderr and "DEFAULT ACL" in done.stderr
        assert data_only_dump(pg.url(target)) == data_only_dump(source)
    finally:
        pg.drop_database(target)


def test_restore_shows_progress_on_a_terminal(pg: Server, source: URL, tmp_path: Path) -> None:
    assert ops(source, tmp_path, "backup", "run").returncode == 0
    backup_id = BackupDirectory(tmp_path).backups(str(source.database))[-1].id
    target = f"{source.database}_tty"
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ops.cli",
                "backup",
                "restore",
                backup_id,
                "--target-db",
                target,
            ],
            env=env_for(source, BACKUP_DIR=str(tmp_path)),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=terminal,
        )
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            shown += chunk
        assert process.wait(60) == 0
    finally:
        os.close(controller)
        pg.drop_database(target)
    total = shown.decode().rsplit("[", 1)[-1].split("]")[0]
    assert b"\r\x1b[K[1/" in shown
    assert f"[{total}]".encode() in shown and total.split("/")[0] == total.split("/")[1]


def _scratch_databases(pg: Server) -> list[str]:
    engine = create_engine(pg.admin_url)
    with engine.connect() as connection:
        names = connection.execute(
            text("SELECT datname FROM pg_database WHERE datname LIKE :p ORDER BY 1"),
            {"p": SCRATCH_PREFIX + "%"},
        ).scalars()
        found = list(names)
    engine.dispose()
    return found


def test_drill_drops_scratch_databases_left_by_killed_drills_of_our_backups_only(
    pg: Server, source: URL, tmp_path: Path
) -> None:
    settings = settings_for(source, tmp_path)
    older, newer = run_backup(settings), run_backup(settings)
    theirs = scratch_database("20200101T000000Z-abcdef")  # another directory's backup
    pg.execute(f'CREATE DATABASE "{scratch_database(older.id)}"')
    pg.execute(f'CREATE DATABASE "{theirs}"')
    try:
        assert drill(settings, newer).ok
        assert _scratch_databases(pg) == [theirs]
    finally:
        pg.drop_database(theirs)
        pg.drop_database(scratch_database(older.id))


def test_cancelled_drill_drops_its_scratch_database_and_records_no_verdict(
    pg: Server, source: URL, tmp_path: Path
) -> None:
    settings = settings_for(source, tmp_path)
    manifest = run_backup(settings)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(DrillCancelled):
        drill(settings, manifest, cancel)
    assert _scratch_databases(pg) == []
    recorded = BackupDirectory(tmp_path).get(manifest.id)
    assert recorded is not None and recorded.verifications == []
