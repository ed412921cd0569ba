"""Applies the retention plan to the backup directory.

Only good backups of the configured database are candidates; other databases' backups, foreign
files, invalid manifests and temporaries are invisible here. Records of failed runs of this
database that are older than its newest good backup are removed too: they carry no data and
have been superseded.

A backup someone is reading (a restore, a verification) is kept this time: prune takes the
backup's lock exclusively without waiting, and says so when it cannot. A backup a run has just
taken is passed as ``protected`` and never deleted by that run, whatever the other manifests'
clocks say.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime

from ops.backup.lock import (
    RUN_LOCK,
    DirectoryLock,
    LockHeld,
    claim_for_deletion,
    manifest_lock,
    remove_stale_read_locks,
)
from ops.backup.manifest import BackupDirectory, Manifest, UnsafeEntry, utc_now
from ops.backup.retention import Candidate, GfsRetention, RetentionPlan, is_future
from ops.settings import BackupSettings, Settings

log = logging.getLogger(__name__)


def retention_for(backup: BackupSettings) -> GfsRetention:
    return GfsRetention.from_counts(
        backup.keep_last, backup.keep_daily, backup.keep_weekly, backup.keep_monthly
    )


def candidate(manifest: Manifest) -> Candidate:
    return Candidate(manifest.id, manifest.started, manifest.verified)


@dataclass
class PruneResult:
    plan: RetentionPlan
    backups: dict[str, Manifest]
    deleted: list[str] = field(default_factory=list)
    failed_records: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # id -> why it was kept this time
    invalid: dict[str, str] = field(default_factory=dict)  # file -> why it was ignored
    dry_run: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "delete": [c.id for c in self.plan.delete],
            "deleted": self.deleted,
            "keep": self.plan.keep,
            "skipped": self.skipped,
            "future_dated": [c.id for c in self.plan.future],
            "invalid": self.invalid,
            "failed_records_removed": self.failed_records,
        }


def plan_prune(
    settings: Settings, protected: Collection[str] = (), now: datetime | None = None
) -> PruneResult:
    store = BackupDirectory(settings.backup.directory)
    backups = {m.id: m for m in store.backups(settings.db.database)}
    plan = retention_for(settings.backup).plan(
        (candidate(m) for m in backups.values()), now=now, protected=protected
    )
    _keep_queued(settings, plan)
    for future in plan.future:
        log.warning(
            "backup %s is dated in the future (%s); kept, and not trusted for retention",
            future.id,
            backups[future.id].started_at,
        )
    return PruneResult(plan, backups, invalid=dict(store.invalid))


def _keep_queued(settings: Settings, plan: RetentionPlan) -> None:
    """A backup still waiting for the off-host store is kept: deleting it would lose the only
    copy the store was going to get (its queue is read from ``OFFSITE_DIR``, no store call)."""
    if not settings.offsite.enabled:
        return
    from ops.offsite.dumpqueue import queued_ids

    queued = queued_ids(settings.offsite.directory)
    for doomed in list(plan.delete):
        if doomed.id in queued:
            plan.delete.remove(doomed)
            plan.keep.setdefault(doomed.id, []).append("queued for the off-host store")


def prune(
    settings: Settings,
    *,
    dry_run: bool = False,
    locked: bool = False,
    protected: Collection[str] = (),
) -> PruneResult:
    """Delete what the plan says; ``locked`` when the caller already holds the run lock."""
    run_lock = DirectoryLock(settings.backup.directory, RUN_LOCK, "backup prune")
    if not locked and not dry_run:
        BackupDirectory(settings.backup.directory).check()  # a clear error, not a lock file
        run_lock.acquire()
    try:
        now = utc_now()
        result = plan_prune(settings, protected, now)
        result.dry_run = dry_run
        if dry_run:
            return result
        store = BackupDirectory(settings.backup.directory)
        for doomed in result.plan.delete:
            try:
                with claim_for_deletion(store, doomed.id), manifest_lock(store.root, "prune"):
                    store.delete(result.backups[doomed.id])
            except (LockHeld, UnsafeEntry) as held:  # being read, or its lock file is planted
                result.skipped[doomed.id] = str(held)
                log.warning("retention kept %s this time: %s", doomed.id, held)
                continue
            result.deleted.append(doomed.id)
            log.info("retention deleted backup %s", doomed.id)
        trusted = [m.started for m in result.backups.values() if not is_future(m.started, now)]
        newest = max(trusted, default=None)
        records = store.manifests()
        for record in records:
            if (
                not record.ok
                and record.database == settings.db.database
                and newest is not None
                and record.started < newest
            ):
                with manifest_lock(store.root, "backup prune"):
                    store.delete(record, data=False)  # a failed run published no data
                result.failed_records.append(record.id)
        remove_stale_read_locks(store, (m.id for m in records))
        return result
    finally:
        run_lock.release()
