"""Applies the retention plan to the backup directory.

Only good backups of the configured database are candidates; other databases' backups, foreign
files and temporaries are invisible here. Records of failed runs of this database that are older
than its newest good backup are removed too: they carry no data and have been superseded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ops.backup.lock import RUN_LOCK, DirectoryLock, manifest_lock
from ops.backup.manifest import BackupDirectory, Manifest
from ops.backup.retention import Candidate, GfsRetention, RetentionPlan
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
    dry_run: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "delete": [c.id for c in self.plan.delete],
            "deleted": self.deleted,
            "keep": self.plan.keep,
            "failed_records_removed": self.failed_records,
        }


def plan_prune(settings: Settings) -> PruneResult:
    store = BackupDirectory(settings.backup.directory)
    backups = {m.id: m for m in store.backups(settings.db.database)}
    plan = retention_for(settings.backup).plan(candidate(m) for m in backups.values())
    return PruneResult(plan, backups)


def prune(settings: Settings, *, dry_run: bool = False, locked: bool = False) -> PruneResult:
    """Delete what the plan says; ``locked`` when the caller already holds the run lock."""
    run_lock = DirectoryLock(settings.backup.directory, RUN_LOCK, "backup prune")
    if not locked and not dry_run:
        run_lock.acquire()
    try:
        result = plan_prune(settings)
        result.dry_run = dry_run
        if dry_run:
            return result
        store = BackupDirectory(settings.backup.directory)
        for doomed in result.plan.delete:
            with manifest_lock(store.root, "backup prune"):
                store.delete(result.backups[doomed.id])
            result.deleted.append(doomed.id)
            log.info("retention deleted backup %s", doomed.id)
        newest = max((m.started for m in result.backups.values()), default=None)
        for record in store.manifests():
            if (
                not record.ok
                and record.database == settings.db.database
                and newest is not None
                and record.started < newest
            ):
                with manifest_lock(store.root, "backup prune"):
                    store.delete(record)
                result.failed_records.append(record.id)
        return result
    finally:
        run_lock.release()
