"""Restore targets against a real PostgreSQL: a target is a database name, never a connection
string; templates, ``postgres`` and the live database are guarded; a replaced database is kept;
a failed restore leaves no new database. Each hostile case proves that no database other than
the one asked for changed (row counts, and the list of databases before and after)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError

from ops.backup.manifest import BackupDirectory, Manifest, checksum_dump
from ops.backup.pgtools import find_tool
from ops.backup.restore import RestoreError, _restore, restore_backup
from ops.backup.runner import run_backup
from ops.backup.target import STAGING_PREFIX, kept_name
from ops.backup.toc import read_toc
from tests.conftest import Server, env_for
from tests.integration.backup_helpers import (
    LOST_AT_FORK,
    LOST_SIGTERM,
    REPO,
    data_only_dump,
    ops,
    populate,
    settings_for,
)
from tests.pgcluster import wait_for

COUNTED = ("public.payload", '"Odd Schema"."Mixed Case"')


@pytest.fixture
def source(migrated_db: URL) -> URL:
    populate(migrated_db, rows=300)
    return migrated_db


@pytest.fixture
def backup(source: URL, tmp_path: Path) -> Manifest:
    return run_backup(settings_for(source, tmp_path))


@pytest.fixture
def victim(pg: Server) -> Iterator[str]:
    """A database with data that no restore in these tests may touch."""
    name = pg.create_database()
    populate(pg.url(name), rows=7)
    try:
        yield name
    finally:
        pg.drop_database(name)


def databases(pg: Server) -> set[str]:
    engine = create_engine(pg.admin_url)
    try:
        with engine.connect() as connection:
            return set(connection.execute(text("SELECT datname FROM pg_database")).scalars())
    finally:
        engine.dispose()


def row_counts(pg: Server, database: str) -> dict[str, int]:
    engine = create_engine(pg.url(database))
    try:
        with engine.connect() as connection:
            return {
                table: int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
                for table in COUNTED
            }
    finally:
        engine.dispose()


def objects(pg: Server, database: str) -> int:
    """Relations a user made in ``database`` (what a restore into a template would add)."""
    engine = create_engine(pg.url(database))
    try:
        with engine.connect() as connection:
            return int(
                connection.execute(
                    text(
                        "SELECT count(*) FROM pg_class c JOIN pg_namespace n"
                        " ON n.oid = c.relnamespace WHERE n.nspname NOT IN"
                        " ('pg_catalog', 'information_schema', 'pg_toast')"
                    )
                ).scalar_one()
            )
    finally:
        engine.dispose()


def hostile_names(source: URL, victim: str, pg: Server) -> list[str]:
    other_host = pg.url(victim).set(host="203.0.113.9").render_as_string(hide_password=True)
    return [
        f"dbname={victim}",
        f"host={pg.admin_url.host} port={pg.admin_url.port} dbname={victim}",
        f"host=203.0.113.9 dbname={victim}",
        f"postgresql://{pg.admin_url.host}:{pg.admin_url.port}/{victim}",
        other_host,
        "template1",
        "template0",
        "postgres",
        str(source.database),  # the live database, without --replace-live
        "",
        "x" * 64,
        "é" * 32,  # 32 characters, 64 bytes
        "数据库" * 8,
        "line\nforged",
        "dbops_verify_" + "0" * 20,
    ]


HOSTILE_CASES = range(15)


@pytest.mark.parametrize("case", HOSTILE_CASES)
def test_hostile_target_name_is_refused_in_one_line_and_touches_no_database(
    pg: Server, source: URL, victim: str, backup: Manifest, tmp_path: Path, case: int
) -> None:
    name = hostile_names(source, victim, pg)[case]
    before = databases(pg)
    counts = {db: row_counts(pg, db) for db in (victim, str(source.database))}
    template_objects = {db: objects(pg, db) for db in ("template1", "postgres")}
    extra = ["--force"] if case % 2 else []  # --force does not open any of these doors
    refused = ops(source, tmp_path, "backup", "restore", backup.id, "--target-db", name, *extra)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("restore refused: --target-db "), lines
    assert refused.stdout == ""
    assert pg.admin_url.password and pg.admin_url.password not in refused.stderr
    assert databases(pg) == before
    assert {db: row_counts(pg, db) for db in counts} == counts
    assert {db: objects(pg, db) for db in template_objects} == template_objects


def test_hostile_case_list_matches_the_parametrisation(
    pg: Server, source: URL, victim: str
) -> None:
    assert len(hostile_names(source, victim, pg)) == len(HOSTILE_CASES)


def test_pg_restore_takes_a_connection_string_like_name_literally_even_past_validation(
    pg: Server, source: URL, victim: str, backup: Manifest, tmp_path: Path
) -> None:
    """Beneath the name check, the name reaches pg_restore (and its --jobs workers) quoted."""
    literal = f"dbname={victim} host=203.0.113.9"
    pg.execute(f'CREATE DATABASE "{literal}" TEMPLATE template0')
    counts = row_counts(pg, victim)
    settings = settings_for(source, tmp_path)
    tool = find_tool("pg_restore", None)
    archive = str(BackupDirectory(tmp_path).data_path(backup))
    try:
        _restore(settings, tool, read_toc(tool, archive), archive, literal, 2, None, literal)
        assert row_counts(pg, literal) == row_counts(pg, str(source.database))
        assert row_counts(pg, victim) == counts
    finally:
        pg.drop_database(literal)


def test_a_name_needing_quotes_is_created_and_restored_literally_with_parallel_jobs(
    pg: Server, source: URL, backup: Manifest, tmp_path: Path
) -> None:
    name = 'it\'s a \\ "name" é'
    before = databases(pg)
    try:
        done = ops(source, tmp_path, "backup", "restore", backup.id, "--target-db", name, "-j", "2")
        assert done.returncode == 0, done.stderr
        assert databases(pg) == before | {name}
        assert data_only_dump(pg.url(name)) == data_only_dump(source)
    finally:
        pg.drop_database(name.replace('"', '""'))


def test_postgres_database_is_a_target_only_with_allow_postgres_db(
    pg: Server, source: URL, backup: Manifest, tmp_path: Path
) -> None:
    # The cluster's postgres database is empty: restored into directly, then emptied again.
    assert objects(pg, "postgres") == 0
    try:
        done = ops(
            source, tmp_path, "backup", "restore", backup.id, "--target-db", "postgres",
            "--allow-postgres-db",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert row_counts(pg, "postgres") == row_counts(pg, str(source.database))
    finally:
        pg.execute(
            'DROP SCHEMA IF EXISTS "Odd Schema" CASCADE; DROP SCHEMA public CASCADE;'
            " CREATE SCHEMA public AUTHORIZATION pg_database_owner;"
            " GRANT USAGE ON SCHEMA public TO PUBLIC",
            database="postgres",
        )
    assert objects(pg, "postgres") == 0


def _kept(pg: Server, target: str) -> list[str]:
    return sorted(
        db for db in databases(pg) if re.fullmatch(rf"{target}_replaced_\d{{8}}T\d{{6}}Z", db)
    )


def test_replacing_the_live_database_renames_and_keeps_it_and_ends_its_sessions(
    pg: Server, source: URL, victim: str, backup: Manifest, tmp_path: Path
) -> None:
    live = str(source.database)
    pg.execute("INSERT INTO payload (label) VALUES ('after the backup')", database=live)
    after_backup = row_counts(pg, live)
    victim_counts = row_counts(pg, victim)
    before = databases(pg)
    app = create_engine(source)
    session = app.connect()  # a service holding a session on the live database
    session.execute(text("SELECT 1"))
    try:
        done = ops(
            source, tmp_path, "backup", "restore", backup.id, "--target-db", live,
            "--force", "--replace-live",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        [kept] = _kept(pg, live)
        assert databases(pg) == before | {kept}
        assert row_counts(pg, kept) == after_backup  # the old state, kept
        assert row_counts(pg, live)["public.payload"] == 300  # the backup's state
        assert row_counts(pg, victim) == victim_counts
        assert f'kept as "{kept}"' in done.stdout and "to go back" in done.stdout
        assert f'ALTER DATABASE "{kept}" RENAME TO "{live}"' in done.stdout
        assert "replacing database" in done.stderr
        engine = create_engine(pg.url(kept))
        with engine.connect() as connection:  # the kept database accepts connections again
            assert connection.execute(text("SELECT 1")).scalar() == 1
        engine.dispose()
        with pytest.raises(OperationalError):  # its session was ended for the rename
            session.execute(text("SELECT 1"))
    finally:
        session.invalidate()
        app.dispose()
        for name in _kept(pg, live):
            pg.drop_database(name)


def test_forced_restore_over_a_non_empty_target_keeps_the_old_one(
    pg: Server, source: URL, backup: Manifest, tmp_path: Path
) -> None:
    target = pg.create_database()
    pg.execute("CREATE TABLE precious (x int); INSERT INTO precious VALUES (1)", target)
    before = databases(pg)
    try:
        forced = ops(
            source, tmp_path, "backup", "restore", backup.id, "--target-db", target, "--force"
        )
        assert forced.returncode == 0, forced.stderr
        [kept] = _kept(pg, target)
        assert databases(pg) == before | {kept}
        engine = create_engine(pg.url(kept))
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM precious")).scalar() == 1
        engine.dispose()
        assert data_only_dump(pg.url(target)) == data_only_dump(source)
    finally:
        pg.drop_database(target)
        for name in _kept(pg, target):
            pg.drop_database(name)


def _corrupt_largest_data_block(dump: Path) -> None:
    """Garble the middle of the archive's biggest zlib stream (a table's rows): the table of
    contents still reads, and pg_restore fails only when it reaches that table's data."""
    data = bytearray(dump.read_bytes())
    streams = []
    for start in range(len(data) - 2):
        if data[start] == 0x78 and (data[start] * 256 + data[start + 1]) % 31 == 0:
            inflater = zlib.decompressobj()
            try:
                size = len(inflater.decompress(bytes(data[start:])))
            except zlib.error:
                continue
            if inflater.eof:
                streams.append((size, start, len(data) - len(inflater.unused_data)))
    size, start, end = max(streams)
    assert size > 1000, streams
    for offset in range((start + end) // 2, end - 4):
        data[offset] ^= 0x5A
    dump.write_bytes(bytes(data))


def test_a_restore_failing_midway_on_a_corrupt_archive_leaves_no_new_database(
    pg: Server, source: URL, backup: Manifest, tmp_path: Path
) -> None:
    dump = tmp_path / f"{backup.id}.dump"
    _corrupt_largest_data_block(dump)
    backup.files = checksum_dump(dump)
    BackupDirectory(tmp_path).write(backup)
    before = databases(pg)
    target = f"{source.database}_corrupt"
    failed = ops(source, tmp_path, "backup", "restore", backup.id, "--target-db", target)
    assert failed.returncode == 1, failed.stderr
    assert "restore failed: pg_restore exited" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert databases(pg) == before


def _staging(pg: Server) -> str:
    [name] = [db for db in databases(pg) if db.startswith(STAGING_PREFIX)]
    return name


def test_a_target_created_by_someone_else_midway_is_left_alone_and_staging_dropped(
    pg: Server, source: URL, backup: Manifest, tmp_path: Path
) -> None:
    target = f"t_{uuid.uuid4().hex[:12]}"
    before = databases(pg)
    made: list[str] = []

    def meanwhile(done: int, total: int, item: str) -> None:
        if not made:  # another session takes the name while the restore runs
            made.append(_staging(pg))
            pg.execute(f'CREATE DATABASE "{target}" TEMPLATE template0')

    try:
        with pytest.raises(RestoreError, match="already exists"):
            restore_backup(settings_for(source, tmp_path), backup.id, target, progress=meanwhile)
        assert made and made[0] not in databases(pg)
        assert databases(pg) == before | {target}
        assert objects(pg, target) == 0  # theirs, untouched
    finally:
        pg.drop_database(target)


def test_a_replace_failing_at_the_swap_leaves_the_live_database_as_it_was(
    pg: Server, source: URL, backup: Manifest, tmp_path: Path
) -> None:
    live = str(source.database)
    pg.execute("INSERT INTO payload (label) VALUES ('after the backup')", database=live)
    counts = row_counts(pg, live)
    before = databases(pg)
    taken: list[str] = []

    def meanwhile(done: int, total: int, item: str) -> None:
        if not taken:  # the name the old database would be kept under is taken meanwhile
            stamp = _staging(pg).removeprefix(STAGING_PREFIX).split("_")[0]
            when = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            taken.append(kept_name(live, when))
            pg.execute(f'CREATE DATABASE "{taken[0]}" TEMPLATE template0')

    settings = settings_for(source, tmp_path)
    try:
        with pytest.raises(RestoreError, match="a database of that name exists"):
            restore_backup(
                settings, backup.id, live, force=True, replace_live=True, progress=meanwhile
            )
        assert databases(pg) == before | set(taken)
        assert row_counts(pg, live) == counts  # still reachable, still the old data
    finally:
        for name in taken:
            pg.drop_database(name)


@pytest.fixture
def restorer(pg: Server) -> Iterator[tuple[str, str]]:
    """Shaped like the sidecar's backup role: may create databases, owns none of the others."""
    name, password = f"t_restorer_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    pg.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' CREATEDB IN ROLE pg_read_all_data")
    try:
        yield name, password
    finally:
        pg.execute(f"DROP ROLE IF EXISTS {name}")


def test_a_role_that_cannot_rename_the_target_is_refused_before_anything_is_created(
    pg: Server,
    source: URL,
    victim: str,
    backup: Manifest,
    tmp_path: Path,
    restorer: tuple[str, str],
) -> None:
    user, password = restorer
    counts = row_counts(pg, victim)
    before = databases(pg)
    refused = ops(
        source.set(username=user, password=password), tmp_path,
        "backup", "restore", backup.id, "--target-db", victim, "--force",
    )  # fmt: skip
    assert refused.returncode == 1
    assert "only its owner" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert databases(pg) == before
    assert row_counts(pg, victim) == counts


def test_a_restore_stopped_with_sigterm_drops_its_staging_database(
    pg: Server, migrated_db: URL, tmp_path: Path
) -> None:
    populate(migrated_db, rows=30_000)  # a restore that lasts long enough to be stopped
    backup = run_backup(settings_for(migrated_db, tmp_path))
    before = databases(pg)
    target = f"{migrated_db.database}_stopped"
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "backup", "restore", backup.id, "--target-db", target],
        env=env_for(migrated_db, BACKUP_DIR=str(tmp_path)),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: any(db.startswith(STAGING_PREFIX) for db in databases(pg)), 30)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert databases(pg) == before
    assert pg_restore_processes() == []


def test_a_sigterm_lost_while_a_child_starts_still_stops_the_restore(
    pg: Server, migrated_db: URL, tmp_path: Path
) -> None:
    populate(migrated_db, rows=3_000)
    backup = run_backup(settings_for(migrated_db, tmp_path))
    before = databases(pg)
    target = f"{migrated_db.database}_lost_signal"
    stopped = subprocess.run(
        [sys.executable, "-c", LOST_SIGTERM, "backup", "restore", backup.id, "--target-db", target],
        env=env_for(migrated_db, BACKUP_DIR=str(tmp_path)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert LOST_AT_FORK in stopped.stderr  # the interrupt really was lost
    assert "Traceback" not in stopped.stderr and "Exception ignored" not in stopped.stderr
    assert stopped.returncode == 130, stopped.stderr
    assert databases(pg) == before
    assert pg_restore_processes() == []


def pg_restore_processes() -> list[int]:
    """Pids of pg_restore processes writing into a staging database."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[0].endswith(b"pg_restore") and STAGING_PREFIX.encode() in argv[1]:
            found.append(int(entry.name))
    return found


def test_a_replace_that_cannot_end_the_target_sessions_leaves_it_open_and_unchanged(
    pg: Server, source: URL, backup: Manifest, tmp_path: Path, restorer: tuple[str, str]
) -> None:
    user, password = restorer
    target = f"t_{uuid.uuid4().hex[:12]}"
    pg.execute(f'CREATE DATABASE "{target}" OWNER {user} TEMPLATE template0')
    pg.execute("CREATE TABLE precious (x int); INSERT INTO precious VALUES (1)", target)
    before = databases(pg)
    superuser = create_engine(pg.url(target))
    session = superuser.connect()  # a superuser's session the owner may not end
    try:
        refused = ops(
            source.set(username=user, password=password), tmp_path,
            "backup", "restore", backup.id, "--target-db", target, "--force",
        )  # fmt: skip
        assert refused.returncode == 1
        assert "could not take the name" in refused.stderr and "is as it was" in refused.stderr
        assert "superuser" in refused.stderr
        assert databases(pg) == before
        assert session.execute(text("SELECT count(*) FROM precious")).scalar() == 1
        engine = create_engine(pg.url(target))  # new sessions are accepted again
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM precious")).scalar() == 1
        engine.dispose()
    finally:
        session.close()
        superuser.dispose()
        pg.drop_database(target)


def test_a_database_marked_as_template_is_refused_even_with_force(
    pg: Server, source: URL, backup: Manifest, tmp_path: Path
) -> None:
    template = pg.create_database()
    pg.execute(f'ALTER DATABASE "{template}" IS_TEMPLATE true')
    before = databases(pg)
    try:
        for extra in ([], ["--force"]):
            refused = ops(
                source, tmp_path, "backup", "restore", backup.id, "--target-db", template, *extra
            )
            assert refused.returncode == 2, refused.stderr
            assert "is a template database" in refused.stderr
            assert len(refused.stderr.splitlines()) == 1
            assert databases(pg) == before
            assert objects(pg, template) == 0
    finally:
        pg.execute(f'ALTER DATABASE "{template}" IS_TEMPLATE false')
        pg.drop_database(template)


def test_a_replaced_database_passes_its_owner_and_privileges_to_the_restored_one(
    pg: Server, source: URL, backup: Manifest, tmp_path: Path, restorer: tuple[str, str]
) -> None:
    owner, _ = restorer
    target = f"t_{uuid.uuid4().hex[:12]}"
    pg.execute(f'CREATE DATABASE "{target}" OWNER {owner} TEMPLATE template0')

    def grants(database: str) -> tuple[str, list[str]]:
        engine = create_engine(pg.admin_url)
        try:
            with engine.connect() as connection:
                row = connection.execute(
                    text(
                        "SELECT pg_get_userbyid(datdba),"
                        " ARRAY(SELECT CASE a.grantee WHEN 0 THEN 'PUBLIC'"
                        " ELSE pg_get_userbyid(a.grantee) END || ':' || a.privilege_type"
                        " || ':' || a.is_grantable FROM aclexplode(datacl) a ORDER BY 1)"
                        " FROM pg_database WHERE datname = :name"
                    ),
                    {"name": database},
                ).one()
                return str(row[0]), list(row[1])
        finally:
            engine.dispose()

    try:
        pg.execute(
            f'REVOKE ALL ON DATABASE "{target}" FROM PUBLIC;'
            f' GRANT CONNECT, TEMPORARY ON DATABASE "{target}" TO pg_monitor WITH GRANT OPTION'
        )
        pg.execute("CREATE TABLE precious (x int)", target)
        expected = grants(target)
        assert "pg_monitor:CONNECT:true" in expected[1] and expected[0] == owner
        assert not any(entry.startswith("PUBLIC:") for entry in expected[1])
        done = ops(
            source, tmp_path, "backup", "restore", backup.id, "--target-db", target, "--force"
        )
        assert done.returncode == 0, done.stderr
        [kept] = _kept(pg, target)
        assert grants(kept) == expected
        assert grants(target) == expected
    finally:
        pg.drop_database(target)
        for name in _kept(pg, target):
            pg.drop_database(name)
