"""Restoring a backup into a database of its own.

The target is created when missing. An existing target must be empty unless ``force``, which
drops and recreates it: restoring over live data would merge two states into one that never
existed. The archive's checksums are checked first, so a damaged file fails in seconds rather
than after half a restore.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from ops.backup.children import die_with_parent
from ops.backup.lock import LockHeld, reading
from ops.backup.manifest import BackupDirectory
from ops.backup.pgtools import (
    RESTORE_APPLICATION_NAME,
    ToolError,
    backup_engine,
    find_tool,
    first_error_line,
    libpq_env,
    quote_ident,
)
from ops.backup.toc import read_toc, restorable, restore_rights
from ops.backup.verify import checksum_problems, resolve
from ops.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # items done, items in the archive, current item

# Anything a user made: relations, schemas other than public, extensions other than plpgsql.
OBJECTS_SQL = text(
    r"""
    SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp\_%')
         + (SELECT count(*) FROM pg_namespace
            WHERE nspname NOT IN ('public', 'pg_catalog', 'information_schema')
              AND nspname NOT LIKE 'pg\_toast%' AND nspname NOT LIKE 'pg\_temp\_%')
         + (SELECT count(*) FROM pg_extension WHERE extname <> 'plpgsql')
    """
)


class RestoreError(Exception):
    pass


@dataclass
class RestoreResult:
    backup_id: str
    target: str
    duration_seconds: float
    items: int
    replaced: bool


def restore_backup(
    settings: Settings, backup_id: str, target: str, **options: Any
) -> RestoreResult:
    """Restore while holding the backup's read lock: retention cannot delete it mid-restore."""
    try:
        with reading(BackupDirectory(settings.backup.directory), backup_id):
            return _restore_backup(settings, backup_id, target, **options)
    except (LockHeld, OSError, ValueError) as exc:
        raise RestoreError(str(exc)) from exc


def _restore_backup(
    settings: Settings,
    backup_id: str,
    target: str,
    *,
    force: bool = False,
    jobs: int = 1,
    progress: Progress | None = None,
) -> RestoreResult:
    try:
        manifest = resolve(settings, backup_id)
    except Exception as exc:
        raise RestoreError(str(exc)) from exc
    store = BackupDirectory(settings.backup.directory)
    if problems := checksum_problems(store, manifest):
        raise RestoreError(f"backup {backup_id} is damaged: {'; '.join(problems)}")
    tool = find_tool("pg_restore", settings.backup.bindir)
    archive = str(store.data_path(manifest))
    clock = time.monotonic()
    # Read the archive before touching the target: an unreadable one leaves nothing behind.
    try:
        toc = read_toc(tool, archive)
    except ToolError as exc:
        raise RestoreError(f"cannot read backup {backup_id}: {exc}") from exc
    replaced = _prepare_target(settings, target, force)
    superuser, trusted = _restore_rights(settings, target)
    plan = restorable(toc, superuser=superuser, trusted_extensions=trusted)
    if plan.skipped:
        log.warning(
            "restoring without %d entries only a superuser can restore: %s",
            len(plan.skipped),
            "; ".join(plan.skipped),
        )
    total = plan.entries
    with tempfile.NamedTemporaryFile("w", prefix="dbops-restore-", suffix=".list") as use_list:
        use_list.write(plan.listing)
        use_list.flush()
        command = [tool.path, f"--dbname={target}", "--verbose", f"--jobs={max(1, jobs)}"]
        command += [f"--use-list={use_list.name}"]
        if not superuser:
            command += ["--no-owner"]  # ownership can only be given away by a superuser
        command.append(archive)
        code, errors, done = _run_restore(command, settings, target, jobs, total, progress)
    if code != 0 or errors:
        shown = errors[0] if errors else first_error_line("")
        raise RestoreError(
            f"pg_restore exited {code} with {len(errors)} error(s) restoring into {target}: {shown}"
        )
    if progress is not None and done < total:
        progress(total, total, "done")
    return RestoreResult(manifest.id, target, time.monotonic() - clock, total, replaced)


def _run_restore(
    command: list[str],
    settings: Settings,
    target: str,
    jobs: int,
    total: int,
    progress: Progress | None,
) -> tuple[int, list[str], int]:
    """Run pg_restore, counting archive items for progress; exit code, errors, items done."""
    env = libpq_env(
        settings.db.url.set(database=target),
        RESTORE_APPLICATION_NAME,
        settings.db.connect_timeout,
    )
    errors: list[str] = []
    done = 0
    # What pg_restore --verbose says once per archive item: serially it announces each item;
    # in parallel each item is "processing item" (serial phases) or "finished item" (workers).
    steps = (
        ("processing item", "finished item")
        if jobs > 1
        else ("creating ", "executing ", "processing data")
    )
    process = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=die_with_parent(),  # a killed restore must not keep writing the target
    )
    assert process.stderr is not None
    for raw in process.stderr:
        line = raw.strip()
        if "error:" in line:
            errors.append(line)
        elif line.startswith("pg_restore: ") and any(word in line for word in steps):
            done = min(total, done + 1)
            if progress is not None:
                progress(done, total, line.removeprefix("pg_restore: "))
    return process.wait(), errors, done


def _maintenance_database(settings: Settings, target: str) -> str | None:
    """Where to run CREATE/DROP DATABASE: the configured database, unless it is the target."""
    return "postgres" if target == settings.db.database else None


def _prepare_target(settings: Settings, target: str, force: bool) -> bool:
    """Create the target, or check it is empty; with ``force`` drop and recreate it."""
    admin = backup_engine(
        settings.db,
        _maintenance_database(settings, target),
        application_name=RESTORE_APPLICATION_NAME,
    )
    name = quote_ident(target)
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            exists = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": target}
            ).first()
            if exists is None:
                connection.execute(text(f"CREATE DATABASE {name} TEMPLATE template0"))
                return False
            objects = _count_objects(settings, target)
            if objects == 0:
                return False
            if not force:
                raise RestoreError(
                    f"target database {target} is not empty ({objects} objects); "
                    "use --force to drop and recreate it"
                )
            log.warning("dropping non-empty database %s (--force)", target)
            connection.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
            connection.execute(text(f"CREATE DATABASE {name} TEMPLATE template0"))
            return True
    finally:
        admin.dispose()


def _count_objects(settings: Settings, database: str) -> int:
    engine = backup_engine(settings.db, database, application_name=RESTORE_APPLICATION_NAME)
    try:
        with engine.connect() as connection:
            return int(connection.execute(OBJECTS_SQL).scalar_one())
    finally:
        engine.dispose()


def _restore_rights(settings: Settings, database: str) -> tuple[bool, set[str]]:
    engine = backup_engine(settings.db, database, application_name=RESTORE_APPLICATION_NAME)
    try:
        with engine.connect() as connection:
            return restore_rights(connection)
    finally:
        engine.dispose()
