"""One backup run: ``pg_dump`` from an exported snapshot into a temporary name, then publish.

The run opens a REPEATABLE READ transaction, exports its snapshot, hands it to ``pg_dump
--snapshot`` and counts every table's rows in that same snapshot while the dump runs; the counts
in the manifest therefore describe exactly the data in the dump, which is what lets the restore
drill compare for equality instead of "roughly".

Publication order: dump into ``.dbops-tmp-<id>/<id>.dump`` (pg_dump fsyncs its output), hash,
rename to ``<id>.dump``, fsync the directory, then write the manifest. The temporary directory is
made by this run (``mkdir`` fails on any existing name, a planted link included) and is private
to it, so pg_dump, which opens its output by name and follows links, never writes through a
link someone placed in the backup directory. Until the manifest exists the dump is
not a backup; a failed or interrupted run deletes its temporary files and records a manifest with
``status: failed`` and no data, which nothing treats as a backup.

``pg_dump`` dies with the run (:mod:`ops.backup.children`) and inherits the run lock's
descriptor: even a dump that somehow outlived its parent keeps the directory locked until it
exits, so the next run never removes a temporary file a live dump is still writing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2.extensions import ISOLATION_LEVEL_REPEATABLE_READ
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from db.errors import error_line
from db.redact import redact
from ops.backup.children import die_with_parent
from ops.backup.lock import RUN_LOCK, DirectoryLock, manifest_lock
from ops.backup.manifest import (
    PRIVATE_DIR_MODE,
    PRIVATE_UMASK,
    STATUS_FAILED,
    STATUS_OK,
    BackupDirectory,
    Manifest,
    UnsafeEntry,
    checksum_dump,
    dump_size,
    format_time,
    fsync_directory,
    new_backup_id,
    remove_path,
    utc_now,
)
from ops.backup.pgtools import (
    APPLICATION_NAME,
    DUMP_APPLICATION_NAME,
    ClientTool,
    ToolError,
    check_client_version,
    find_tool,
    first_error_line,
    libpq_env,
    libpq_params,
    quote_ident,
)
from ops.settings import BackupSettings, Settings
from ops.units import human_size

log = logging.getLogger(__name__)
# The one summary line of a good run, for the sidecar's log. `ops backup run` prints its own
# result instead and quiets this logger, so a run through `make backup` says it once.
summary = logging.getLogger("ops.backup.summary")

POLL_SECONDS = 0.2
Progress = Callable[[int], None]  # bytes written so far

# Tables whose data pg_dump writes: ordinary tables (partitions included, their parents hold no
# rows of their own), not temporary ones, not members of extensions.
TABLES_SQL = r"""
    SELECT n.nspname, c.relname
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'r' AND c.relpersistence <> 't'
      AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp\_%'
      AND NOT EXISTS (SELECT 1 FROM pg_depend d
                      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                        AND d.deptype = 'e')
    ORDER BY 1, 2
"""


class BackupError(Exception):
    """The run failed; the message is meant for the operator."""


class BackupCancelled(BackupError):
    pass


def compression_args(compression: str, tool: ClientTool) -> list[str]:
    """``BACKUP_COMPRESSION`` as pg_dump options; methods other than gzip need pg_dump 16."""
    if compression.isdigit():
        return ["-Z", compression]
    if tool.major >= 16:
        return [f"--compress={compression}"]
    method, _, level = compression.partition(":")
    if method == "none":
        return ["-Z", "0"]
    if method == "gzip":
        return ["-Z", level or "6"]
    raise ToolError(f"BACKUP_COMPRESSION {compression} needs pg_dump 16 or newer ({tool.version})")


def pg_dump_command(
    tool: ClientTool, backup: BackupSettings, output: Path, snapshot: str | None
) -> list[str]:
    """The argv of the dump. It holds no connection details: those travel in the environment."""
    command = [tool.path, f"--format={backup.format}", f"--file={output}"]
    command += compression_args(backup.compression, tool)
    if backup.format == "directory" and backup.jobs > 1:
        command += [f"--jobs={backup.jobs}"]
    if snapshot:
        command += [f"--snapshot={snapshot}"]
    return command


def count_rows(connection: Connection, tables: list[tuple[str, str]]) -> dict[str, int]:
    """Exact row counts, in the transaction open on ``connection``. One backend only: the
    counts run beside pg_dump and must not take the CPUs it needs with parallel workers."""
    counts = {}
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        for schema, table in tables:
            # no parameters are passed, so a % in a name is no placeholder
            cursor.execute(f"SELECT count(*) FROM {quote_ident(schema)}.{quote_ident(table)}")
            counts[f"{schema}.{table}"] = int(_row(cursor)[0])
    return counts


def _row(cursor: Cursor) -> tuple[Any, ...]:
    """The one row a query of the run returns."""
    row = cursor.fetchone()
    if row is None:
        raise BackupError(f"no row returned by {str(cursor.query)[:60]!r}")
    return tuple(row)


def connect(
    settings: Settings, application_name: str = APPLICATION_NAME, database: str | None = None
) -> Connection:
    """A plain psycopg2 connection with the settings' login and connect timeout, to their
    database or ``database``: a backup needs one session for its snapshot, and psycopg2 alone
    loads in a tenth of SQLAlchemy's time."""
    db = settings.db
    url = db.url if database is None else db.url.set(database=database)
    connection: Connection = psycopg2.connect(
        **libpq_params(url, application_name, db.connect_timeout)  # type: ignore[call-overload]
    )
    return connection


def run_backup(
    settings: Settings,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    after_success: Callable[[Manifest], None] | None = None,
) -> Manifest:
    """Take the directory lock, dump, publish; ``after_success`` runs still under the lock.

    Raises :class:`ops.backup.lock.LockHeld` when another run holds the lock, and
    :class:`BackupError` when the run failed (its failed manifest is written when possible).
    """
    directory = settings.backup.directory
    try:
        directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        lock = DirectoryLock(directory, RUN_LOCK, "backup run")
        lock.acquire()
    except OSError as exc:
        reason = str(exc) if isinstance(exc, UnsafeEntry) else exc.strerror
        raise BackupError(f"backup directory {directory} is not usable: {reason}") from exc
    try:
        store = BackupDirectory(directory)
        try:
            with manifest_lock(directory, "backup run"):  # a verification may be writing
                for name in store.remove_temporaries():
                    log.info("removed leftover of an interrupted run: %s", name)
        except OSError as exc:
            raise BackupError(f"backup directory {directory} is not usable: {exc}") from exc
        manifest = _dump(settings, store, progress, cancel, lock.fileno())
        if after_success is not None:
            after_success(manifest)
        return manifest
    finally:
        lock.release()


def _dump(
    settings: Settings,
    store: BackupDirectory,
    progress: Progress | None,
    cancel: threading.Event | None,
    lock_fd: int,
) -> Manifest:
    backup = settings.backup
    started, clock = utc_now(), time.monotonic()
    backup_id = new_backup_id(started)
    final_name = f"{backup_id}.{'dump' if backup.format == 'custom' else 'dir'}"
    workdir = store.temp_path(backup_id)
    temp = workdir / final_name
    manifest = Manifest(
        id=backup_id,
        database=settings.db.database,
        format=backup.format,
        compression=backup.compression,
        status=STATUS_FAILED,
        started_at=format_time(started) or "",
    )
    # `pg_dump --version` (through Debian's Perl wrapper, a tenth of a second) runs while this
    # thread connects and exports the snapshot: all of it stands between the run's start and the
    # dump's.
    probe = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbops-backup-probe")
    tool_found = probe.submit(find_tool, "pg_dump", backup.bindir)
    connection: Connection | None = None
    try:
        workdir.mkdir(mode=PRIVATE_DIR_MODE)  # never an existing name: nothing planted is used
        with _tool_error_first(tool_found):
            connection = connect(settings)
            connection.set_session(isolation_level=ISOLATION_LEVEL_REPEATABLE_READ, readonly=True)
            with connection.cursor() as cursor:
                cursor.execute("SELECT current_setting('server_version_num')::int, version()")
                version_num, version = _row(cursor)
                manifest.server_version = str(version)
                tool = tool_found.result()
                manifest.pg_dump_version = tool.version
                check_client_version(tool, int(version_num))
                cursor.execute("SELECT pg_export_snapshot()")
                (snapshot,) = _row(cursor)
                cursor.execute(TABLES_SQL)
                tables = [(str(s), str(t)) for s, t in cursor.fetchall()]
            command = pg_dump_command(tool, backup, temp, str(snapshot))
            env = libpq_env(settings.db.url, DUMP_APPLICATION_NAME, settings.db.connect_timeout)
            manifest.tables = _dump_while_counting(
                command, env, temp, settings, connection, tables, progress, cancel, lock_fd
            )
            connection.rollback()  # read only: nothing to commit
        # pg_dump has fsynced its output already (we never pass --no-sync).
        manifest.files = checksum_dump(temp, backup.jobs, final_name)
        manifest.size_bytes = dump_size(temp)
        os.replace(temp, store.root / final_name)
        manifest.path = final_name  # from here on a failure must remove the published dump
        fsync_directory(store.root)
        remove_path(workdir)
        manifest.status = STATUS_OK
        _finish(manifest, clock)
        store.write(manifest)
        summary.info(
            "backup %s ok: %s, %s in %.2fs, %d tables",
            backup_id,
            final_name,
            human_size(manifest.size_bytes),
            manifest.duration_seconds or 0.0,
            len(manifest.tables),
        )
        return manifest
    except BaseException as exc:
        remove_path(workdir)
        if manifest.path:  # published, but the manifest could not be written
            remove_path(store.root / manifest.path)
            manifest.path = None
        manifest.status = STATUS_FAILED
        manifest.error = _describe(exc)
        manifest.files, manifest.size_bytes = {}, 0
        _finish(manifest, clock)
        try:
            store.write(manifest)
        except OSError as write_error:
            log.warning("could not record the failed run %s: %s", backup_id, write_error)
        if isinstance(exc, BackupError):
            raise
        if isinstance(exc, Exception):
            raise BackupError(manifest.error) from exc
        raise
    finally:
        probe.shutdown(wait=True)
        if connection is not None:
            connection.close()


@contextlib.contextmanager
def _tool_error_first(tool_found: Future[ClientTool]) -> Iterator[None]:
    """A missing or broken pg_dump is the error to report, as when it was looked for before
    connecting, even if the connection failed as well."""
    try:
        yield
    except Exception:
        if isinstance(tool_found.exception(), ToolError):
            tool_found.result()  # raises it
        raise


def _dump_while_counting(
    command: list[str],
    env: dict[str, str],
    output: Path,
    settings: Settings,
    snapshot_holder: Connection,
    tables: list[tuple[str, str]],
    progress: Progress | None,
    cancel: threading.Event | None,
    lock_fd: int,
) -> dict[str, int]:
    """Run pg_dump while a thread counts rows in the snapshot; the calling thread stays free to
    notice cancellation, Ctrl-C or a dead pg_dump, and to stop both sides."""
    backend = snapshot_holder.get_backend_pid()  # asked before the count keeps it busy
    counted: list[dict[str, int]] = []
    count_error: list[BaseException] = []

    def count() -> None:
        try:
            counted.append(count_rows(snapshot_holder, tables))
        except BaseException as exc:
            count_error.append(exc)

    counter = threading.Thread(target=count, name="dbops-backup-count", daemon=True)
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=stderr,
            umask=PRIVATE_UMASK,
            pass_fds=(lock_fd,),  # the run lock stays held while pg_dump lives
            preexec_fn=die_with_parent(),
        )
        counter.start()
        try:
            _wait(process, output, progress, cancel)
            if process.returncode == 0:
                while counter.is_alive():
                    counter.join(POLL_SECONDS)
                    if cancel is not None and cancel.is_set():
                        raise BackupCancelled("backup cancelled: the service is stopping")
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if counter.is_alive():
                _cancel_query(settings, backend)
                counter.join(30)
        if process.returncode != 0:
            stderr.seek(0)
            message = first_error_line(stderr.read().decode("utf-8", "replace"))
            raise BackupError(f"pg_dump failed (exit {process.returncode}): {message}")
    if count_error:
        raise count_error[0]
    if progress is not None:
        progress(dump_size(output))
    return counted[0]


def _wait(
    process: subprocess.Popen[bytes],
    output: Path,
    progress: Progress | None,
    cancel: threading.Event | None,
) -> None:
    # A pidfd turns readable the moment pg_dump exits; Popen.wait(timeout) would poll with
    # sleeps of up to 50 ms, which is a measurable share of a small database's dump.
    pidfd = _pidfd(process.pid)
    try:
        while True:
            if pidfd is not None:
                select.select([pidfd], [], [], POLL_SECONDS)
            try:
                process.wait(0 if pidfd is not None else POLL_SECONDS)
                return
            except subprocess.TimeoutExpired:
                pass
            _check_progress(output, progress, cancel)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _check_progress(
    output: Path, progress: Progress | None, cancel: threading.Event | None
) -> None:
    if cancel is not None and cancel.is_set():
        raise BackupCancelled("backup cancelled: the service is stopping")
    if progress is not None and output.exists():
        progress(dump_size(output))


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: fall back to polling
        return None


def _cancel_query(settings: Settings, backend: int) -> None:
    """Interrupt the row count that the server process ``backend`` runs for another thread.

    Through ``pg_cancel_backend`` on a connection of its own (connect and statement timeouts
    bounded), not psycopg2's ``cancel()``: that waits for the server while holding Python's
    global interpreter lock, so against a frozen server it stopped every thread of the
    sidecar, its HTTP endpoints and signal handling included.
    """
    try:
        canceller = connect(settings)
        try:
            with canceller.cursor() as cursor:
                cursor.execute("SET statement_timeout = '5s'")
                cursor.execute("SELECT pg_cancel_backend(%s)", (backend,))
        finally:
            canceller.close()
    except Exception as exc:  # the connection may be gone already; nothing left to cancel
        log.debug("could not cancel the row count: %s", error_line(exc))


def _finish(manifest: Manifest, clock: float) -> None:
    manifest.finished_at = format_time(utc_now())
    manifest.duration_seconds = round(time.monotonic() - clock, 3)


def _describe(exc: BaseException) -> str:
    """What a failed run's manifest and log line say: one line, passwords redacted."""
    return redact(_describe_unredacted(exc))


def _describe_unredacted(exc: BaseException) -> str:
    if isinstance(exc, BackupError | ToolError):
        return str(exc)
    if isinstance(exc, psycopg2.Error):
        return f"database error: {error_line(exc)}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}"
