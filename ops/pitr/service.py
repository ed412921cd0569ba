"""The sidecar's PITR component: streaming kept alive, WAL switched out, base backups on a
schedule, retention, and a status snapshot for metrics and ``/healthz``.

``barman cron`` is the supervisor Barman itself provides: each run starts ``receive-wal`` when
it is not running (creating the slot when missing), moves streamed segments into the archive
and applies the retention policy. We run it every ``PITR_CRON_INTERVAL``. Every job catches its
own failures: they become log lines and the snapshot's problems, never a dead scheduler.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.cron import CronTrigger
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from db.errors import error_line
from db.pgurl import sqlalchemy_url
from ops.offsite.metrics import OffsiteCounters
from ops.offsite.shipper import Shipper
from ops.pitr.barman import BackupInfo, BarmanError, make_barman
from ops.pitr.metrics import PitrCollector, PitrCounters
from ops.pitr.restore import WAL_SEGMENT_BYTES, parse_lsn, segment_end_lsn
from ops.pitr.settings import SERVER_NAME
from ops.pitr.state import close_gap, record_gap
from ops.pitr.status import (
    PitrStatus,
    archived_wal,
    gather,
    new_timeline,
    streamed_files,
    timeline_of,
    went_back,
)
from ops.pitr.walswitch import WalSwitcher
from ops.settings import Settings

log = logging.getLogger(__name__)

CRON_JOB, SWITCH_JOB, BASEBACKUP_JOB = "dbops-pitr-cron", "dbops-pitr-switch", "dbops-pitr-base"
DRILL_JOB = "dbops-pitr-drill"
SOON_JOB = "dbops-pitr-base-now"
PITR_APPLICATION_NAME = "dbops-pitr"
MISFIRE_GRACE = 3600
STOP_WAIT = 120.0  # seconds stop() waits for a supervision run under way
ARCHIVE_WAIT = 10.0  # seconds a switch waits for streaming to deliver the closed segment


def pitr_engine(settings: Settings) -> Engine:
    """Pool-less, with a statement timeout: a WAL switch or status query never hangs a job."""
    timeout_ms = max(1000, int(settings.sidecar.query_timeout * 1000))
    return create_engine(
        sqlalchemy_url(settings.db.url),
        poolclass=NullPool,
        connect_args={
            "application_name": PITR_APPLICATION_NAME,
            "connect_timeout": settings.db.connect_timeout,
            "options": f"-c statement_timeout={timeout_ms}",
        },
    )


class PitrService:
    name = "pitr"

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        offsite_counters: OffsiteCounters | None = None,
    ) -> None:
        self.settings = settings
        # Off-host shipping of what Barman archives (OFFSITE_S3_URL), or None.
        self.shipper: Shipper | None = None
        if settings.offsite.enabled:
            self.shipper = Shipper(
                settings.offsite, settings.pitr, offsite_counters or OffsiteCounters(registry)
            )
        self.barman = make_barman(settings)
        self.engine = pitr_engine(settings)
        self.switcher = WalSwitcher(self.engine)
        self.snapshot: PitrStatus | None = None
        self.streaming_since_down: float | None = None  # when streaming was last seen down
        self.last_backup_error: str | None = None
        self._backup_lock = threading.Lock()
        # Held while supervision runs: stop() waits for it, so a `barman cron` already under way
        # cannot start receive-wal again after stop() ended it (it would outlive the sidecar).
        self._supervise_lock = threading.Lock()
        self._stopping = threading.Event()
        self._newest: BackupInfo | None = None  # show-backup of the newest good one, cached
        self.counters = PitrCounters(registry)
        self._scheduler: BaseScheduler | None = None
        registry.register(
            PitrCollector(
                settings.pitr, lambda: self.snapshot, lambda: self._newest, self._backup_lock.locked
            )
        )

    # -- Component protocol ---------------------------------------------------------------
    def start(self, scheduler: BaseScheduler) -> None:
        pitr = self.settings.pitr
        self._scheduler = scheduler
        self.barman.prepare()
        if self.shipper is not None:
            self.shipper.start()
        now = datetime.now(UTC)
        scheduler.add_job(
            self.supervise,
            "interval",
            seconds=pitr.cron_interval,
            id=CRON_JOB,
            next_run_time=now,
        )
        scheduler.add_job(self.switch_wal, "interval", seconds=pitr.archive_timeout, id=SWITCH_JOB)
        scheduler.add_job(
            self.base_backup,
            CronTrigger.from_crontab(pitr.basebackup_schedule, timezone=UTC),
            id=BASEBACKUP_JOB,
            misfire_grace_time=MISFIRE_GRACE,
        )
        scheduler.add_job(
            self.drill,
            CronTrigger.from_crontab(pitr.drill_schedule, timezone=UTC),
            id=DRILL_JOB,
            misfire_grace_time=MISFIRE_GRACE,
        )
        log.info(
            "pitr: streaming through slot %s, base backups '%s', recovery window %d days",
            pitr.slot_name,
            pitr.basebackup_schedule,
            pitr.retention_days,
        )

    def health_problems(self) -> list[str]:
        down_since = self.streaming_since_down
        limit = self.settings.pitr.streaming_down_limit
        if down_since is not None and time.time() - down_since > limit:
            return [f"pitr: WAL streaming down for {time.time() - down_since:.0f}s"]
        return []

    def readiness_detail(self) -> dict[str, Any]:
        """For ``/readyz``: whether the off-host store takes our copies. Said, not failed on:
        a store outage must not take the sidecar (and its metrics) out of service."""
        if self.shipper is None:
            return {}
        status = self.shipper.status
        return {
            "offsite": {
                "ok": status.store_ok,
                "detail": status.store_detail,
                "kind": status.store_kind,
                "shipping": self.shipper.alive(),
            }
        }

    def stop(self) -> None:
        if self.shipper is not None:
            self.shipper.stop()
        self._stopping.set()
        held = self._supervise_lock.acquire(timeout=STOP_WAIT)
        if not held:
            log.warning(
                "pitr: supervision still runs after %gs; stopping streaming anyway", STOP_WAIT
            )
        try:
            self.barman.stop_receive_wal()
        except BarmanError as error:
            log.error("pitr: stopping WAL streaming failed: %s", error)
        finally:
            if held:
                self._supervise_lock.release()
            self.engine.dispose()

    # -- jobs -------------------------------------------------------------------------------
    def supervise(self) -> None:
        """``barman cron``, then a fresh snapshot; the first base backup when there is none.
        A lost slot or a new timeline (the server was recovered) restarts streaming first.
        Never once the service is stopping: that would start streaming again."""
        with self._supervise_lock:
            if not self._stopping.is_set():
                self._supervise()

    def _supervise(self) -> None:
        started = time.monotonic()
        snapshot = self.refresh()
        if new_timeline(snapshot):
            self.follow_new_timeline(snapshot)
            return
        if went_back(snapshot, self.settings.pitr):
            self.follow_earlier_timeline(snapshot)
            return
        if snapshot.slot is not None and snapshot.slot.wal_status == "lost":
            self.recover_lost_slot(snapshot)
            return
        try:
            self.barman.cron()
        except BarmanError as error:
            log.error("pitr: barman cron failed: %s", error)
        if self.shipper is not None:
            self.shipper.scan()
        snapshot = self.refresh()
        # A backup still waiting for its WAL counts: taking another would not help it.
        pending = [b for b in snapshot.backups if b.status in ("STARTED", "WAITING_FOR_WALS")]
        if (
            not snapshot.problems
            and not snapshot.good_backups
            and not pending
            and not self._backup_lock.locked()
        ):
            log.info("pitr: no base backup yet: taking one now")
            self.base_backup_soon()
        log.debug("pitr: supervision took %.1fs", time.monotonic() - started)

    def follow_new_timeline(self, snapshot: PitrStatus) -> None:
        """After a recovery the server writes a new timeline: streaming restarts from the
        server's position (the old partial segment belongs to the abandoned history), and a
        fresh base backup starts the new recovery window. Earlier backups and WAL are kept."""
        log.warning(
            "pitr: the server writes %s, the archive ends with %s: it was recovered; restarting "
            "streaming on the new timeline and taking a fresh base backup",
            snapshot.current_wal,
            snapshot.last_wal_archived,
        )
        try:
            self.barman.stop_receive_wal()
            self.barman.run("receive-wal", "--reset", SERVER_NAME)
            self.barman.cron()
        except BarmanError as error:
            log.error("pitr: restarting streaming on the new timeline failed: %s", error)
            return
        self.refresh()
        self.base_backup_soon()

    def follow_earlier_timeline(self, snapshot: PitrStatus) -> None:
        """The data from before a recovery was put back (README's way back): the server writes
        an earlier timeline than streaming holds. The later timeline's streamed files are moved
        aside into PITR_DIR (kept, never deleted), streaming restarts from the server's
        position, and a fresh base backup follows: base backups taken on the abandoned
        timeline cannot replay the earlier one."""
        current = timeline_of(snapshot.current_wal or "")
        aside = self.settings.pitr.directory / (
            "streaming-set-aside-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        )
        log.warning(
            "pitr: the server writes %s, streaming holds a later timeline: the data from before "
            "a recovery was put back; moving that timeline's streamed files to %s, restarting "
            "streaming and taking a fresh base backup",
            snapshot.current_wal,
            aside,
        )
        try:
            self.barman.stop_receive_wal()
            later = [path for timeline, path in streamed_files(self.settings.pitr)
                     if timeline > current]  # fmt: skip
            aside.mkdir(mode=0o700, exist_ok=True)
            for path in later:
                path.rename(aside / path.name)
            self.barman.run("receive-wal", "--reset", SERVER_NAME)
            self.barman.cron()
        except BarmanError as error:
            log.error("pitr: restarting streaming on the earlier timeline failed: %s", error)
            return
        except OSError as error:
            log.error("pitr: moving streamed files aside failed: %s", error.strerror)
            return
        self.refresh()
        self.base_backup_soon()

    def base_backup_soon(self) -> None:
        """A base backup now, in a job of its own on the daemon's scheduler, so supervision
        (which keeps streaming alive) goes on during a backup that may take hours; without a
        scheduler (one-off use) it runs here."""
        if self._scheduler is None:
            self.base_backup()
            return
        self._scheduler.add_job(
            self.base_backup, id=SOON_JOB, replace_existing=True, misfire_grace_time=None
        )

    def recover_lost_slot(self, snapshot: PitrStatus) -> None:
        """The server dropped WAL the archive never got (the sidecar was down past the cap):
        the archive has a gap after ``last_wal_archived``. Restart streaming from the server's
        current position through a new slot, and take a base backup at once so there is a
        recovery window again. Recovery to a point inside the gap stays impossible, and the
        slot-lost metric and ``ops pitr check`` said so until now."""
        log.error(
            "pitr: slot %s lost WAL after %s: recovery into the gap is impossible; resetting "
            "streaming and taking a new base backup",
            self.settings.pitr.slot_name,
            snapshot.last_wal_archived or "the start",
        )
        try:
            record_gap(self.settings.pitr.state_file, snapshot.last_wal_archived, time.time())
        except OSError as error:
            log.error("pitr: recording the gap failed: %s", error.strerror)
        try:
            self.barman.stop_receive_wal()
            self.barman.run("receive-wal", "--drop-slot", SERVER_NAME)
            self.barman.run("receive-wal", "--create-slot", SERVER_NAME)
            self.barman.run("receive-wal", "--reset", SERVER_NAME)
            self.counters.slot_resets.inc()
            self.barman.cron()
        except BarmanError as error:
            log.error("pitr: resetting streaming failed: %s", error)
            return
        self.refresh()
        self.base_backup_soon()

    def refresh(self) -> PitrStatus:
        snapshot = gather(self.barman, self.engine, checks=True)
        good = snapshot.good_backups
        if good and (self._newest is None or self._newest.id != good[-1].id):
            try:
                self._newest = self.barman.show(good[-1].id)
            except BarmanError as error:
                snapshot.problems.append(str(error))
        if snapshot.streaming:
            self.streaming_since_down = None
        elif self.streaming_since_down is None:
            self.streaming_since_down = time.time()
        self.snapshot = snapshot
        return snapshot

    def switch_wal(self) -> None:
        """Close the segment when something was written, then archive it as soon as streaming
        has received all of it (a few seconds at most), not at the next supervision run."""
        try:
            closed = self.switcher.tick()
        except exc.SQLAlchemyError as error:
            log.error("pitr: WAL switch failed: %s", error_line(error))
            return
        if not closed:
            return
        self.counters.switches.inc()
        position = parse_lsn(self.switcher.last_switch_lsn or "0/0")
        closed_end = position - position % WAL_SEGMENT_BYTES  # where the new segment starts
        deadline = time.monotonic() + ARCHIVE_WAIT
        try:
            while True:
                self.barman.archive_wal()
                newest = archived_wal(self.settings.pitr)[1]
                if newest is not None and segment_end_lsn(newest) >= closed_end:
                    if self.shipper is not None:
                        self.shipper.scan()
                    return
                if time.monotonic() > deadline:
                    log.warning("pitr: the switched segment is not archived yet; cron will")
                    return
                time.sleep(0.5)
        except BarmanError as error:
            log.error("pitr: archiving switched WAL failed: %s", error)

    def base_backup(self) -> dict[str, Any] | None:
        """One base backup; a second one asked for while one runs is skipped, not queued."""
        if not self._backup_lock.acquire(blocking=False):
            log.info("pitr: a base backup is already running")
            return None
        started = time.monotonic()
        try:
            backup_id = self.barman.backup()
            backup = self.barman.show(backup_id)
        except BarmanError as error:
            self.last_backup_error = str(error)
            self.counters.base_backups.labels("failed").inc()
            log.error("pitr: base backup failed after %.1fs: %s", time.monotonic() - started, error)
            return None
        finally:
            self._backup_lock.release()
        self.last_backup_error = None
        self.counters.base_backups.labels("ok").inc()
        if self.shipper is not None:
            self.shipper.scan()
        try:
            close_gap(self.settings.pitr.state_file, backup.id)
        except OSError as error:
            log.error("pitr: recording the gap's end failed: %s", error.strerror)
        log.info(
            "pitr: base backup %s ok: %.1f MB in %.1fs",
            backup.id,
            backup.size_bytes / 1e6,
            time.monotonic() - started,
        )
        self.refresh()
        return {"id": backup.id}

    def drill(self) -> None:
        """The scheduled PITR drill; its result is recorded in PITR_DIR and logged."""
        from ops.pitr.drill import drill

        record = drill(self.settings, self.barman)
        self.counters.drills.labels("ok" if record.ok else "failed").inc()
        if record.ok:
            log.info(
                "pitr: drill ok: %s restored to %s in %.1fs%s",
                record.backup_id,
                record.target_time,
                record.seconds,
                "; kept from retention" if record.kept else "",
            )
        else:
            log.error("pitr: drill FAILED after %.1fs: %s", record.seconds, record.error)
