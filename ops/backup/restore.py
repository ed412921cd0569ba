"""Restoring a backup into a database of its own.

The target is a database name (see :mod:`ops.backup.target` for the names refused). The restore
fills a staging database and gives it the target's name once ``pg_restore`` has succeeded, so a
failed restore leaves no new database behind and an existing target as it was (see
:mod:`ops.backup.replace`). An existing target must be empty, and is then restored into directly;
a non-empty one is replaced only with ``force``, the live database only with ``replace_live`` too,
and a replaced database is renamed and kept, never dropped: restoring over live data would merge
two states into one that never existed, and the old state may still be needed. The archive's
checksums are checked first, so a damaged file fails in seconds rather than after half a restore.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from db.errors import error_line
from ops.backup import replace
from ops.backup.children import die_with_parent
from ops.backup.lock import LockHeld, reading
from ops.backup.manifest import BackupDirectory, Manifest
from ops.backup.pgtools import (
    RESTORE_APPLICATION_NAME,
    ClientTool,
    ToolError,
    backup_engine,
    find_tool,
    first_error_line,
    libpq_env,
)
from ops.backup.target import (
    TargetError,
    check_target,
    conninfo,
    kept_name,
    shown,
    staging_name,
)
from ops.backup.toc import RestoreList, read_toc, restorable, restore_rights
from ops.backup.verify import checksum_problems, resolve
from ops.hints import spell
from ops.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # items done, items in the archive, current item

LIVE = "the live database the stack runs on (POSTGRES_DB / DATABASE_URL)"
SOURCE = "the database this backup was taken of"


class RestoreError(Exception):
    pass


@dataclass
class RestoreResult:
    backup_id: str
    target: str
    duration_seconds: float
    items: int
    replaced: bool
    kept: str | None = None  # the replaced database, under the name it is kept as


def live_databases(settings: Settings, manifest: Manifest | None = None) -> dict[str, str]:
    """Databases that take ``--force --replace-live``, with why."""
    live = {settings.db.database: LIVE} if settings.db.database else {}
    if manifest is not None and manifest.database and manifest.database not in live:
        live[manifest.database] = SOURCE
    return live


def restore_backup(
    settings: Settings, backup_id: str, target: str, **options: Any
) -> RestoreResult:
    """Restore while holding the backup's read lock: retention cannot delete it mid-restore."""
    try:
        with reading(BackupDirectory(settings.backup.directory), backup_id):
            return _restore_backup(settings, backup_id, target, **options)
    except TargetError:
        raise  # bad usage (exit 2), not a failed restore
    except (LockHeld, OSError, ValueError) as exc:
        raise RestoreError(str(exc)) from exc


def _restore_backup(
    settings: Settings,
    backup_id: str,
    target: str,
    *,
    force: bool = False,
    replace_live: bool = False,
    allow_postgres: bool = False,
    jobs: int = 1,
    progress: Progress | None = None,
) -> RestoreResult:
    """Raises :class:`~ops.backup.target.TargetError` (bad usage) before anything changes."""
    options = {"force": force, "replace_live": replace_live, "allow_postgres": allow_postgres}
    check_target(target, live=live_databases(settings), **options)
    try:
        manifest = resolve(settings, backup_id)
    except Exception as exc:
        raise RestoreError(str(exc)) from exc
    check_target(target, live=live_databases(settings, manifest), **options)
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
    now = datetime.now(UTC)
    staging, kept = staging_name(now, secrets.token_hex(3)), kept_name(target, now)
    admin = replace.admin_engine(settings, avoid={target, staging, kept})
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            state = replace.inspect_target(settings, connection, target)
            if state is not None and state.is_template:
                raise TargetError(
                    f"{spell('--target-db')} {shown(target)}: is a template database "
                    "(IS_TEMPLATE true); what a restore put there would be copied into every "
                    "database made from it"
                )
            replacing = _replacing(settings, manifest, target, state, force)
            if state is not None and not replacing:  # empty: restore straight into it
                total = _restore(settings, tool, toc, archive, target, jobs, progress, target)
                return RestoreResult(manifest.id, target, time.monotonic() - clock, total, False)
            if state is not None and not state.can_rename:
                raise RestoreError(
                    f"cannot replace {target}: only its owner ({state.owner}) with CREATEDB or "
                    f"a superuser may rename it; run the restore as {state.owner}"
                )
            if state is not None and replace.exists(connection, kept):
                raise RestoreError(
                    f"cannot keep {target} as {kept}: a database of that name exists"
                )
            replace.create(connection, staging)
            try:
                total = _restore(settings, tool, toc, archive, staging, jobs, progress, target)
                _take_name(connection, staging, target, kept, state)
            except BaseException:
                replace.drop_staging(connection, staging)
                raise
    except replace.ReplaceError as error:
        raise RestoreError(str(error)) from error
    finally:
        admin.dispose()
    replaced = state is not None
    return RestoreResult(
        manifest.id, target, time.monotonic() - clock, total, replaced, kept if replaced else None
    )


def _take_name(
    connection: Connection,
    staging: str,
    target: str,
    kept: str,
    state: replace.TargetState | None,
) -> None:
    """Give the filled staging database the target's name, keeping any database it replaces."""
    try:
        if state is None:
            replace.rename(connection, staging, target)
        else:
            log.warning("replacing database %s; the current one is kept as %s", target, kept)
            replace.swap_in(connection, staging, target, kept, state)
    except SQLAlchemyError as error:
        kept_as_it_was = f", {target} is as it was" if state is not None else ""
        raise RestoreError(
            f"the restore succeeded but could not take the name {target} "
            f"({error_line(error)}): the restored copy was dropped{kept_as_it_was}"
        ) from error


def _replacing(
    settings: Settings,
    manifest: Manifest,
    target: str,
    state: replace.TargetState | None,
    force: bool,
) -> bool:
    """Whether the existing target is replaced (renamed and kept) rather than restored into."""
    if state is None:
        return False
    if target in live_databases(settings, manifest):
        return True  # check_target saw --force --replace-live
    if state.objects == 0 and state.allows_connections:
        return False
    if not force:
        raise RestoreError(
            f"target database {target} is not empty ({state.objects} objects); use "
            f"{spell('--force')} to replace it (the current one is renamed and kept, not dropped)"
        )
    return True


def _restore(
    settings: Settings,
    tool: ClientTool,
    toc: str,
    archive: str,
    database: str,
    jobs: int,
    progress: Progress | None,
    target: str,
) -> int:
    """``pg_restore`` into ``database`` (for ``target``); the number of archive items restored."""
    superuser, trusted = _restore_rights(settings, database)
    plan: RestoreList = restorable(toc, superuser=superuser, trusted_extensions=trusted)
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
        # The name as a quoted conninfo value: never read as a connection string of its own.
        command = [tool.path, f"--dbname={conninfo(database)}", "--verbose"]
        command += [f"--jobs={max(1, jobs)}", f"--use-list={use_list.name}"]
        if not superuser:
            command += ["--no-owner"]  # ownership can only be given away by a superuser
        command.append(archive)
        code, errors, done = _run_restore(command, settings, database, jobs, total, progress)
    if code != 0 or errors:
        shown = errors[0] if errors else first_error_line("")
        raise RestoreError(
            f"pg_restore exited {code} with {len(errors)} error(s) restoring into {target}: {shown}"
        )
    if progress is not None and done < total:
        progress(total, total, "done")
    return total


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
    try:
        for raw in process.stderr:
            line = raw.strip()
            if "error:" in line:
                errors.append(line)
            elif line.startswith("pg_restore: ") and any(word in line for word in steps):
                done = min(total, done + 1)
                if progress is not None:
                    progress(done, total, line.removeprefix("pg_restore: "))
    except BaseException:
        process.terminate()  # interrupted: stop writing before the staging database drops
        process.wait()
        raise
    return process.wait(), errors, done


def _restore_rights(settings: Settings, database: str) -> tuple[bool, set[str]]:
    engine = backup_engine(settings.db, database, application_name=RESTORE_APPLICATION_NAME)
    try:
        with engine.connect() as connection:
            return restore_rights(connection)
    finally:
        engine.dispose()
