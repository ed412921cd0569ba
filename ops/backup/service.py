"""The sidecar's backup component: scheduled runs, retention after success, restore drills.

Jobs run on the daemon's scheduler in UTC, one instance at a time, coalescing missed runs and
accepting a run up to ``MISFIRE_GRACE`` late (a busy executor or a suspended host delays a run;
it should not cancel it). The scheduler keeps no state across restarts, so at start a backup
older than one schedule interval triggers a run at once: a sidecar that was down over its slot
does not wait another day. A failed run is retried a few times, ten minutes apart, for the same
reason. Every job catches its own failures: they become log lines and metrics, never a dead
scheduler thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.cron import CronTrigger
from prometheus_client import CollectorRegistry

from ops.backup.lock import LockHeld
from ops.backup.manifest import PRIVATE_DIR_MODE, BackupDirectory, Manifest, utc_now
from ops.backup.metrics import BackupCollector, BackupCounters
from ops.backup.prune import prune
from ops.backup.retention import is_future
from ops.backup.runner import BackupCancelled, BackupError, run_backup
from ops.backup.verify import DrillCancelled, VerifyError, drill, resolve
from ops.memory import release_freed_memory
from ops.settings import Settings

log = logging.getLogger(__name__)

BACKUP_JOB, VERIFY_JOB = "dbops-backup", "dbops-backup-verify"
MISFIRE_GRACE = 3600  # seconds a run may start late before it is skipped
STOP_WAIT = 20.0  # seconds shutdown waits for a cancelled dump to clean up
RETRY_JOB = "dbops-backup-retry"
RETRY_DELAY = 600.0  # seconds between a failed run and its retry
MAX_RETRIES = 3  # consecutive retries; the schedule takes over after that


def schedule_interval(trigger: CronTrigger, now: datetime) -> timedelta:
    """The gap between the schedule's next two runs after ``now``."""
    first: datetime | None = trigger.get_next_fire_time(None, now)
    assert first is not None
    second: datetime | None = trigger.get_next_fire_time(first, first + timedelta(seconds=1))
    assert second is not None
    return second - first


def needs_catch_up(newest: datetime | None, interval: timedelta, now: datetime) -> bool:
    return newest is None or now - newest > interval


class BackupService:
    name = "backup"

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.store = BackupDirectory(settings.backup.directory)
        self.counters = BackupCounters(registry)
        self._cancel = threading.Event()
        self._running = 0  # backup runs in progress
        self._drilling = 0  # restore drills in progress
        self._retries = 0  # consecutive retries of a failed run
        self._running_lock = threading.Lock()
        self._scheduler: BaseScheduler | None = None
        self._started = time.time()
        # Called with the re-read manifest after a drill passes (off-host copies queue it).
        self.after_verification: Callable[[Manifest], None] | None = None
        registry.register(BackupCollector(settings, self.in_progress, self.next_run))

    # -- Component protocol ---------------------------------------------------------------
    def start(self, scheduler: BaseScheduler) -> None:
        self._scheduler = scheduler
        backup = self.settings.backup
        trigger = CronTrigger.from_crontab(backup.schedule, timezone=UTC)
        now = datetime.now(UTC)
        try:  # the first run creates it anyway; made here so scrapes before it find it
            backup.directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        except OSError as error:
            log.warning("cannot create BACKUP_DIR %s: %s", backup.directory, error.strerror)
        try:
            newest = self.newest_backup()
        except OSError as error:  # an unreadable directory must not stop the sidecar
            log.warning("cannot list backups: %s", error)
            newest = None
        extra: dict[str, Any] = {}
        if needs_catch_up(newest.started if newest else None, schedule_interval(trigger, now), now):
            log.info("newest good backup is older than the schedule interval: backing up now")
            extra["next_run_time"] = now
        scheduler.add_job(
            self.backup_job,
            trigger,
            id=BACKUP_JOB,
            name="backup",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=MISFIRE_GRACE,
            replace_existing=True,
            **extra,
        )
        scheduler.add_job(
            self.verify_job,
            CronTrigger.from_crontab(backup.verify_schedule, timezone=UTC),
            id=VERIFY_JOB,
            name="backup restore drill",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=MISFIRE_GRACE,
            replace_existing=True,
        )

    def health_problems(self) -> list[str]:
        max_age = self.settings.backup.max_age
        try:
            newest = self.newest_backup()
        except OSError as error:
            return [f"backup: {error}"]
        now = time.time()
        if newest is None:
            if now - self._started > max_age:
                return [f"backup: no good backup, BACKUP_MAX_AGE is {max_age:g}s"]
            return []
        finished = newest.finished or newest.started
        age = now - finished.timestamp()
        if age > max_age:
            return [
                f"backup: newest good backup {newest.id} is {age:.0f}s old "
                f"(BACKUP_MAX_AGE {max_age:g}s)"
            ]
        return []

    def stop(self) -> None:
        """Stop a running dump or drill (child terminated, temporaries and scratch database
        removed) and wait for that."""
        self._cancel.set()
        deadline = time.monotonic() + STOP_WAIT
        while (self._running or self._drilling) and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- jobs ---------------------------------------------------------------------------------
    def backup_job(self) -> None:
        with self._running_lock:
            self._running += 1
        failed = True
        try:
            run_backup(self.settings, cancel=self._cancel, after_success=self._retention)
            self.counters.runs.labels("ok").inc()
            failed = False
        except LockHeld as held:
            self.counters.runs.labels("locked").inc()
            log.warning("scheduled backup skipped: %s", held)
            failed = False  # the holder is taking the backup
        except BackupCancelled as cancelled:
            self.counters.runs.labels("failed").inc()
            log.warning("%s", cancelled)
        except BackupError as error:
            self.counters.runs.labels("failed").inc()
            log.error("backup failed: %s", error)
        except Exception:
            self.counters.runs.labels("failed").inc()
            log.exception("backup failed unexpectedly")
        finally:
            with self._running_lock:
                self._running -= 1
            release_freed_memory()
        self._after_run(failed)

    def _after_run(self, failed: bool) -> None:
        """A failed run is retried a few times, RETRY_DELAY apart, rather than waiting a whole
        schedule interval (a day, by default) with no backup."""
        if not failed:
            self._retries = 0
            return
        if self._scheduler is None or self._cancel.is_set() or self._retries >= MAX_RETRIES:
            return
        self._retries += 1
        when = datetime.now(UTC) + timedelta(seconds=RETRY_DELAY)
        log.info("retrying the backup at %s (retry %d of %d)", when, self._retries, MAX_RETRIES)
        self._scheduler.add_job(
            self.backup_job,
            "date",
            run_date=when,
            id=RETRY_JOB,
            name="backup retry",
            misfire_grace_time=MISFIRE_GRACE,
            replace_existing=True,
        )

    def _retention(self, manifest: Manifest) -> None:
        """Runs under the run lock right after a good backup; never fails the backup."""
        try:
            result = prune(self.settings, locked=True, protected=(manifest.id,))
            self.counters.pruned.inc(len(result.deleted))
            if result.deleted:
                log.info("retention deleted %d backup(s): %s", len(result.deleted), result.deleted)
        except OSError as error:  # an unusable directory or a planted entry: one line
            log.error("retention after backup %s failed: %s", manifest.id, error)
        except Exception:
            log.exception("retention after backup %s failed", manifest.id)

    def verify_job(self) -> None:
        with self._running_lock:
            self._drilling += 1
        try:
            manifest = resolve(self.settings, None)
            verification = drill(self.settings, manifest, self._cancel)
            self.counters.verifications.labels("ok" if verification.ok else "failed").inc()
            if verification.ok:
                self._verified(manifest.id)
        except DrillCancelled as cancelled:
            log.warning("%s", cancelled)
        except (VerifyError, LockHeld, OSError) as problem:
            self.counters.verifications.labels("failed").inc()
            log.error("restore drill not run: %s", problem)
        except Exception:
            self.counters.verifications.labels("failed").inc()
            log.exception("restore drill failed unexpectedly")
        finally:
            with self._running_lock:
                self._drilling -= 1
            release_freed_memory()

    def _verified(self, backup_id: str) -> None:
        """Hand a freshly verified backup to :attr:`after_verification`; never fails the job."""
        if self.after_verification is None:
            return
        manifest = self.store.get(backup_id)
        if manifest is None or not manifest.verified:
            return
        try:
            self.after_verification(manifest)
        except Exception:
            log.exception("after verification of %s", backup_id)

    # -- state for metrics --------------------------------------------------------------------
    def in_progress(self) -> int:
        return self._running

    def next_run(self) -> datetime | None:
        if self._scheduler is None:
            return None
        job = self._scheduler.get_job(BACKUP_JOB)
        return getattr(job, "next_run_time", None) if job is not None else None

    def newest_backup(self) -> Manifest | None:
        """The newest good backup not dated in the future (a skewed clock's manifest must not
        hide a stale backup); :class:`OSError` when the directory is unusable."""
        now = utc_now()
        good = [
            m
            for m in self.store.backups(self.settings.db.database)
            if not is_future(m.started, now)
        ]
        return good[-1] if good else None
