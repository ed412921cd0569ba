"""The PITR drill: prove a recovery point, not just a file.

A marker row is committed, the time T after its commit noted, a second marker committed after
T, and the WAL forced into the archive. The newest base backup is restored into a scratch
directory with ``recovery_target_time = T``, started on a loopback port with archiving off,
and must show the first marker and not the second. The scratch server is then stopped and its
directory removed, whatever happened. The markers live in a database of the drill's own
(the backup role may create databases; it may not write the platform's tables).

With ``PITR_DRILL_SOURCE=offsite`` the restore comes from the object store alone (the base
backup with barman-cloud-restore, WAL through barman-cloud-wal-restore during replay), after
waiting until the store holds the markers' WAL: the copy that matters when the host is gone is
the one proven.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, exc, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from db.errors import error_line
from db.pgurl import sqlalchemy_url
from ops.offsite.cloudread import CloudError
from ops.pitr.barman import Barman, BarmanError
from ops.pitr.keep import protect_proven
from ops.pitr.restore import RestoreRefused, Target, parse_lsn, restore, segment_end_lsn
from ops.pitr.scratch import ScratchError, ScratchServer, server_bindir
from ops.pitr.state import DrillRecord, record_drill
from ops.pitr.status import archived_wal, gather
from ops.pitr.walswitch import WalSwitcher
from ops.settings import Settings

log = logging.getLogger(__name__)

DRILL_DATABASE = "dbops_pitr_drill"
DRILL_APPLICATION_NAME = "dbops-pitr-drill"
ARCHIVE_WAIT = 120.0  # seconds the drill waits for its markers' WAL to reach the archive
RECOVERY_TIMEOUT = 1800.0  # seconds the scratch server may take to reach T and promote
# seconds the drill waits for its markers' WAL to be shipped to the object store
OFFSITE_SHIP_WAIT = 600.0


class DrillFailed(Exception):
    """The drill could not prove the recovery point; the message says which step failed."""


def _engine(settings: Settings, database: str) -> Engine:
    return create_engine(
        sqlalchemy_url(settings.db.url.set(database=database)),
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={
            "application_name": DRILL_APPLICATION_NAME,
            "connect_timeout": settings.db.connect_timeout,
        },
    )


def write_markers(settings: Settings, run_id: str) -> tuple[datetime, str]:
    """Commit the two markers around T; T, and the insert LSN just after the second commit."""
    admin = _engine(settings, settings.db.database)
    try:
        with admin.connect() as connection:
            exists = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": DRILL_DATABASE}
            ).scalar()
            if not exists:
                connection.execute(text(f'CREATE DATABASE "{DRILL_DATABASE}"'))
    finally:
        admin.dispose()
    engine = _engine(settings, DRILL_DATABASE)
    try:
        with engine.connect() as connection:
            connection.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS drill_marker (run_id text NOT NULL, "
                    "marker text NOT NULL, committed_at timestamptz NOT NULL "
                    "DEFAULT clock_timestamp())"
                )
            )
            connection.execute(
                text("DELETE FROM drill_marker WHERE committed_at < now() - interval '7 days'")
            )
            connection.execute(
                text("INSERT INTO drill_marker (run_id, marker) VALUES (:r, 'before')"),
                {"r": run_id},
            )
            target: datetime = connection.execute(text("SELECT clock_timestamp()")).scalar_one()
            time.sleep(0.01)  # the second commit's timestamp is strictly after T
            connection.execute(
                text("INSERT INTO drill_marker (run_id, marker) VALUES (:r, 'after')"),
                {"r": run_id},
            )
            lsn = connection.execute(text("SELECT pg_current_wal_insert_lsn()::text")).scalar_one()
    finally:
        engine.dispose()
    return target.astimezone(UTC), str(lsn)


def force_wal_out(settings: Settings, barman: Barman, lsn: str) -> None:
    """Switch WAL and archive until the archive holds everything up to ``lsn``."""
    from ops.pitr.service import pitr_engine

    engine = pitr_engine(settings)
    try:
        WalSwitcher(engine).tick()
    finally:
        engine.dispose()
    wanted = parse_lsn(lsn)
    deadline = time.monotonic() + ARCHIVE_WAIT
    while True:
        barman.archive_wal()
        newest = archived_wal(settings.pitr)[1]
        if newest is not None and segment_end_lsn(newest) > wanted:
            return
        if time.monotonic() > deadline:
            raise DrillFailed(
                f"the WAL up to {lsn} did not reach the archive within {ARCHIVE_WAIT:g}s "
                f"(newest archived: {newest or 'none'}); is streaming running?"
            )
        time.sleep(1.0)


def wait_shipped(cloud: Any, lsn: str, timeout: float = OFFSITE_SHIP_WAIT) -> None:
    """Until the store holds a WAL segment ending past ``lsn`` (shipping is the sidecar's own
    job; the drill only waits for it)."""
    from ops.offsite.cloudread import CloudError

    wanted = parse_lsn(lsn)
    deadline = time.monotonic() + timeout
    newest: str | None = None
    while True:
        try:
            segments = [w.name for w in cloud.wal_files() if w.is_segment]
        except CloudError as error:
            raise DrillFailed(str(error)) from None
        newest = segments[-1] if segments else None
        if newest is not None and segment_end_lsn(newest) > wanted:
            return
        if time.monotonic() > deadline:
            raise DrillFailed(
                f"the WAL up to {lsn} did not reach the object store within {timeout:g}s "
                f"(newest shipped: {newest or 'none'}); is off-host shipping running?"
            )
        time.sleep(2.0)


def _restore_offsite(settings: Settings, target: Target, lsn: str, data: Path) -> str:
    from ops.offsite.cloudread import CloudReader
    from ops.offsite.recovery import restore_from_store

    cloud = CloudReader(settings.offsite, settings.pitr.barman.parent)
    wait_shipped(cloud, lsn)
    return restore_from_store(cloud, target, data, timeout=RECOVERY_TIMEOUT).backup_id


def _scratch_root(settings: Settings) -> Path:
    """Inside PITR_DIR normally; as root in a private temporary directory, because the
    ``postgres`` user the server then runs as cannot enter PITR_DIR (mode 0700)."""
    if os.geteuid() == 0:
        return Path(tempfile.mkdtemp(prefix="dbops-pitr-drill-"))
    settings.pitr.scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    root = settings.pitr.scratch_dir / f"drill-{stamp}-{uuid.uuid4().hex[:6]}"
    root.mkdir(mode=0o700)
    return root


def check_markers(server: ScratchServer, user: str, run_id: str) -> None:
    engine = server.engine(user, DRILL_DATABASE)
    try:
        with engine.connect() as connection:
            found = set(
                connection.execute(
                    text("SELECT marker FROM drill_marker WHERE run_id = :r"), {"r": run_id}
                ).scalars()
            )
    except exc.SQLAlchemyError as error:
        raise DrillFailed(f"reading the markers failed: {error_line(error)}") from None
    finally:
        engine.dispose()
    if "before" not in found:
        raise DrillFailed("the marker committed before T is missing after recovery to T")
    if "after" in found:
        raise DrillFailed("the marker committed after T is present: recovery overshot T")


def _protect(barman: Barman, backup_id: str) -> bool:
    """Keep the backup the drill proved from retention; a failure is logged, and the drill's
    result stands (the recovery point was proven; its protection is a separate matter)."""
    try:
        protect_proven(barman, backup_id)
    except BarmanError as failure:
        log.error("pitr: keeping the proven base backup %s failed: %s", backup_id, failure)
        return False
    except OSError as failure:
        log.error("pitr: recording the kept base backup failed: %s", failure.strerror)
        return False
    return True


def drill(settings: Settings, barman: Barman) -> DrillRecord:
    """Run one drill, record its result in PITR_DIR, and return it (never raises for a
    failed drill: the failure is the result)."""
    started = time.monotonic()
    run_id = uuid.uuid4().hex
    backup_id: str | None = None
    target_text: str | None = None
    root: Path | None = None
    server: ScratchServer | None = None
    error: str | None = None
    kept = False
    try:
        target, lsn = write_markers(settings, run_id)
        target_text = target.isoformat()
        force_wal_out(settings, barman, lsn)
        wanted = Target("time", time=target, text=target_text)
        root = _scratch_root(settings)
        if settings.pitr.drill_source == "offsite":
            backup_id = _restore_offsite(settings, wanted, lsn, root / "data")
        else:
            backup_id = restore(barman, gather(barman, None), wanted, root / "data").backup_id
        server = ScratchServer(root / "data", server_bindir(settings.backup.bindir))
        server.start(timeout=RECOVERY_TIMEOUT)
        user = settings.db.url.username or "postgres"
        server.wait_promoted(user, DRILL_DATABASE, RECOVERY_TIMEOUT)
        check_markers(server, user, run_id)
    except (DrillFailed, RestoreRefused, BarmanError, ScratchError, CloudError) as failure:
        error = str(failure)
    except exc.SQLAlchemyError as failure:
        error = f"database: {error_line(failure)}"
    except OSError as failure:
        error = f"{failure.filename or 'scratch directory'}: {failure.strerror}"
    finally:
        if server is not None:
            server.stop()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    if error is None and backup_id is not None and settings.pitr.drill_source == "local":
        kept = _protect(barman, backup_id)  # a backup proven in the store is not ours to keep
    record = DrillRecord(
        at=time.time(),
        ok=error is None,
        seconds=round(time.monotonic() - started, 3),
        backup_id=backup_id,
        target_time=target_text,
        error=error,
        kept=kept,
        source=settings.pitr.drill_source,
    )
    try:
        record_drill(settings.pitr.state_file, record)
    except OSError as failure:
        log.error("pitr: recording the drill result failed: %s", failure.strerror)
    return record
