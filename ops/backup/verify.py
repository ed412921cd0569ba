"""Proving backups: the cheap check and the restore drill.

The check re-hashes every file against the manifest and asks ``pg_restore --list`` to read the
archive's table of contents: it catches bit rot, truncation and tampering in seconds. The drill
restores the backup into a scratch database and compares every table's row count with the
counts taken in the dump's own snapshot; since both describe the same snapshot, they must be
equal, not close. The scratch database is dropped whatever happens.

Both hold the backup's read lock (:func:`ops.backup.lock.reading`) while they read the dump, so
retention cannot delete it under them. On a read-only backup directory both still answer; only
the record in the manifest is lost, and the log says so.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from sqlalchemy import text

from db.errors import error_line
from ops.backup.children import die_with_parent
from ops.backup.lock import DirectoryLock, LockHeld, manifest_lock, reading
from ops.backup.manifest import (
    BackupDirectory,
    Manifest,
    ManifestInvalid,
    UnsafeEntry,
    Verification,
    checksum_dump,
    data_name,
    format_time,
    utc_now,
)
from ops.backup.pgtools import (
    VERIFY_APPLICATION_NAME,
    ToolError,
    backup_engine,
    find_tool,
    first_error_line,
    libpq_env,
    quote_ident,
)
from ops.backup.runner import TABLES_SQL, connect, count_rows
from ops.backup.target import MAX_NAME_BYTES, SCRATCH_PREFIX, conninfo
from ops.backup.toc import read_toc, restorable, restore_rights
from ops.hints import spell
from ops.settings import Settings

log = logging.getLogger(__name__)

CHECKSUM, DRILL = "checksum", "drill"
DRILL_LOCK = ".dbops-drill.lock"


class VerifyError(Exception):
    """The backup to verify does not exist or is not a good backup."""


class DrillCancelled(Exception):
    """Stopped from outside; not a verdict on the backup, so nothing is recorded."""


def scratch_database(backup_id: str) -> str:
    """``dbops_verify_<id>``; a long id is cut and given a digest, since PostgreSQL would
    truncate the name and the drill would then drop a database under another name."""
    name = SCRATCH_PREFIX + re.sub(r"[^a-z0-9]", "_", backup_id.lower())
    if len(name) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(backup_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{name[: MAX_NAME_BYTES - 13]}_{digest}"


def checksum_problems(store: BackupDirectory, manifest: Manifest) -> list[str]:
    """Every file whose content differs from the manifest, or that is missing, extra, or not a
    plain file (a link is reported, never followed)."""
    problem = store.data_problem(manifest)
    if problem is not None:
        return [f"{data_name(manifest.id, manifest.format)} {problem}"]
    try:
        actual = checksum_dump(store.data_path(manifest))
    except UnsafeEntry as exc:
        return [f"{Path(exc.filename).name} {exc.strerror}"]
    problems = [
        f"{name}: sha256 mismatch"
        for name, digest in actual.items()
        if name in manifest.files and manifest.files[name] != digest
    ]
    problems += [f"{name}: missing" for name in manifest.files if name not in actual]
    problems += [f"{name}: not in the manifest" for name in actual if name not in manifest.files]
    return problems


def check(settings: Settings, manifest: Manifest) -> Verification:
    """sha256 of every file, then ``pg_restore --list``; recorded in the manifest."""
    store = BackupDirectory(settings.backup.directory)
    started, clock = utc_now(), time.monotonic()
    with reading(store, manifest.id):
        still_there(store, manifest)
        problems = checksum_problems(store, manifest)
        if not problems:
            try:
                tool = find_tool("pg_restore", settings.backup.bindir)
                listing = subprocess.run(
                    [tool.path, "--list", str(store.data_path(manifest))],
                    capture_output=True,
                    text=True,
                    check=False,
                    preexec_fn=die_with_parent(),
                )
                if listing.returncode != 0:
                    problems.append(f"pg_restore --list failed: {first_error_line(listing.stderr)}")
            except ToolError as exc:
                problems.append(str(exc))
    verification = Verification(
        kind=CHECKSUM,
        ok=not problems,
        at=format_time(started) or "",
        duration_seconds=round(time.monotonic() - clock, 3),
        detail="; ".join(problems) if problems else f"{len(manifest.files)} file(s) match",
    )
    record(store, manifest.id, verification)
    return verification


def drill(
    settings: Settings, manifest: Manifest, cancel: threading.Event | None = None
) -> Verification:
    """Restore into ``dbops_verify_<id>``, compare row counts, drop it; recorded in the manifest."""
    store = BackupDirectory(settings.backup.directory)
    # Two drills of one backup would share (and drop) one scratch database.
    with _drill_lock(store), reading(store, manifest.id):
        still_there(store, manifest)
        started, clock = utc_now(), time.monotonic()
        problems = checksum_problems(store, manifest)
        detail = ""
        if not problems:
            try:
                problems, detail = _restore_and_compare(settings, store, manifest, cancel)
            except DrillCancelled:
                raise
            except Exception as exc:  # the drill reports; it never crashes the scheduler
                problems = [f"{type(exc).__name__}: {error_line(exc)}"]
    verification = Verification(
        kind=DRILL,
        ok=not problems,
        at=format_time(started) or "",
        duration_seconds=round(time.monotonic() - clock, 3),
        detail="; ".join(problems[:10]) if problems else detail,
    )
    record(store, manifest.id, verification)
    log.info(
        "restore drill of %s %s in %.1fs: %s",
        manifest.id,
        "ok" if verification.ok else "FAILED",
        verification.duration_seconds,
        verification.detail,
    )
    return verification


def still_there(store: BackupDirectory, manifest: Manifest) -> None:
    """Once the read lock is held: the backup was not deleted while we waited for it."""
    if store.get(manifest.id) is None:
        raise VerifyError(f"backup {manifest.id} was deleted before it could be read")


@contextlib.contextmanager
def _drill_lock(store: BackupDirectory) -> Iterator[None]:
    """The drill lock, or none on a directory we cannot write (a restore host mounting the
    backups read-only): the drill still answers there."""
    lock = DirectoryLock(store.root, DRILL_LOCK, "restore drill")
    try:
        lock.acquire()
    except UnsafeEntry:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES):
            raise
        log.warning("restore drill without the drill lock: %s: %s", store.root, exc.strerror)
    try:
        yield
    finally:
        lock.release()


def _restore_and_compare(
    settings: Settings,
    store: BackupDirectory,
    manifest: Manifest,
    cancel: threading.Event | None,
) -> tuple[list[str], str]:
    tool = find_tool("pg_restore", settings.backup.bindir)
    scratch = scratch_database(manifest.id)
    admin = backup_engine(settings.db, application_name=VERIFY_APPLICATION_NAME)
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            # Scratch databases of earlier drills that were killed before they could drop them:
            # only names derived from this directory's backup ids, so no one else's.
            ours = {scratch_database(m.id) for m in store.manifests()} | {scratch}
            existing = connection.execute(
                text("SELECT datname FROM pg_database WHERE datname LIKE :prefix"),
                {"prefix": SCRATCH_PREFIX + "%"},
            ).scalars()
            for leftover in sorted(set(existing) & ours):
                log.info("dropping scratch database %s left by an interrupted drill", leftover)
                connection.execute(
                    text(f"DROP DATABASE IF EXISTS {quote_ident(leftover)} WITH (FORCE)")
                )
            connection.execute(text(f"CREATE DATABASE {quote_ident(scratch)} TEMPLATE template0"))
        try:
            archive = str(store.data_path(manifest))
            with admin.connect() as connection:
                superuser, trusted = restore_rights(connection)
            # What only a superuser can restore (an untrusted extension such as
            # pg_stat_statements) holds no rows: the drill leaves it out.
            plan = restorable(
                read_toc(tool, archive), superuser=superuser, trusted_extensions=trusted
            )
            with tempfile.NamedTemporaryFile("w", prefix="dbops-drill-", suffix=".list") as listed:
                listed.write(plan.listing)
                listed.flush()
                command = [
                    tool.path,
                    f"--dbname={conninfo(scratch)}",
                    "--no-owner",
                    "--no-privileges",
                    f"--jobs={max(1, settings.backup.jobs)}",
                    f"--use-list={listed.name}",
                    archive,
                ]
                env = libpq_env(
                    settings.db.url.set(database=scratch),
                    VERIFY_APPLICATION_NAME,
                    settings.db.connect_timeout,
                )
                code, stderr = _run_cancellable(command, env, cancel)
            if code != 0:
                return [f"pg_restore failed: {first_error_line(stderr)}"], ""
            return _compare_counts(settings, scratch, manifest)
        finally:
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(
                    text(f"DROP DATABASE IF EXISTS {quote_ident(scratch)} WITH (FORCE)")
                )
    finally:
        admin.dispose()


def _run_cancellable(
    command: list[str], env: dict[str, str], cancel: threading.Event | None
) -> tuple[int, str]:
    """pg_restore that a stopping sidecar can interrupt, so the scratch database still drops."""
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=die_with_parent(),
        )
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    raise DrillCancelled("restore drill cancelled: the service is stopping")
                try:
                    code = process.wait(0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait()
        stderr.seek(0)
        return code, stderr.read().decode("utf-8", "replace")


def _compare_counts(settings: Settings, scratch: str, manifest: Manifest) -> tuple[list[str], str]:
    connection = connect(settings, VERIFY_APPLICATION_NAME, database=scratch)
    try:
        with connection.cursor() as cursor:
            cursor.execute(TABLES_SQL)
            tables = [(str(s), str(t)) for s, t in cursor.fetchall()]
        restored = count_rows(connection, tables)
    finally:
        connection.close()
    problems = [
        f"{name}: {restored.get(name, 'missing')} rows restored, {expected} at dump time"
        for name, expected in manifest.tables.items()
        if restored.get(name) != expected
    ]
    problems += [
        f"{name}: not in the dump's table list" for name in restored if name not in manifest.tables
    ]
    rows = sum(restored.values())
    return problems, f"{len(restored)} tables, {rows} rows match the dump-time counts"


def record(store: BackupDirectory, backup_id: str, verification: Verification) -> bool:
    """Append to the manifest unless retention deleted the backup meanwhile.

    A read-only backup directory (a restore host mounting the backups) still gets its answer;
    only the record is lost, and the log says so.
    """
    try:
        with manifest_lock(store.root, "backup verify"):
            current = store.get(backup_id)
            if current is None:
                log.warning("backup %s vanished before its verification was recorded", backup_id)
                return False
            current.verifications.append(verification)
            store.write(current)
            return True
    except (OSError, LockHeld) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.warning(
            "verification of %s not recorded in its manifest: %s: %s", backup_id, store.root, reason
        )
        return False


def resolve(settings: Settings, backup_id: str | None) -> Manifest:
    """The named good backup of this database, or its newest one."""
    store = BackupDirectory(settings.backup.directory)
    if backup_id is None:
        backups = store.backups(settings.db.database)  # BackupDirError: directory unusable
        if not backups:
            raise VerifyError(f"no backups of {settings.db.database} in {store.root}")
        return backups[-1]
    store.check()  # only the named manifest is read: other files' problems are not ours here
    try:
        manifest = store.load(backup_id)
    except (ManifestInvalid, UnsafeEntry) as invalid:
        raise VerifyError(f"backup {backup_id} cannot be trusted: {invalid}") from None
    if manifest is None or not manifest.path:
        raise VerifyError(
            f"no backup {backup_id} in {store.root} ({spell('ops backup list')} lists them)"
        )
    if not manifest.ok:
        error = "".join(c if c.isprintable() else "?" for c in manifest.error or "")
        raise VerifyError(f"{backup_id} is a failed run ({error}), not a backup")
    problem = store.data_problem(manifest)
    if problem == "missing":
        raise VerifyError(
            f"no backup {backup_id} in {store.root} ({spell('ops backup list')} lists them)"
        )
    if problem is not None:
        raise VerifyError(f"backup {backup_id}: {data_name(backup_id, manifest.format)} {problem}")
    return manifest


def as_dict(manifest: Manifest, verification: Verification) -> dict[str, object]:
    return {"id": manifest.id, **asdict(verification)}
