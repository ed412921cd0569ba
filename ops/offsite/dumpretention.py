"""Retention of the dumps in the store.

The off-host copies keep at least what local retention keeps (the same ``BACKUP_KEEP_*``
counts, so never fewer than the local minimum), plus every backup younger than
``OFFSITE_RETENTION`` when that is set; the newest verified copy always stays (the rule of
:class:`ops.backup.retention.GfsRetention`). Only backups whose manifest in the store passes
the schema are candidates, and an object is deleted only if dbops wrote it: its key is one the
backup's id implies and it carries ``x-amz-meta-dbops-backup`` equal to that id. Anything else
under ``<prefix>/dumps/`` (a file someone put there, a manifest that fails the schema, an
object with another id's mark) is left alone. The manifest goes first, so a listing never
shows a backup whose data is half deleted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ops.backup.manifest import Manifest, utc_now
from ops.backup.prune import candidate, retention_for
from ops.backup.retention import RetentionPlan
from ops.offsite.dumpfetch import offsite_backups
from ops.offsite.dumps import META_BACKUP, data_keys, manifest_key, store_errors
from ops.offsite.store import client
from ops.settings import Settings

if TYPE_CHECKING:
    from botocore.client import BaseClient

log = logging.getLogger(__name__)


@dataclass
class OffsitePrune:
    plan: RetentionPlan
    deleted: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # keys not deleted: not marked as ours
    invalid: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "delete": [c.id for c in self.plan.delete],
            "deleted": self.deleted,
            "keep": self.plan.keep,
            "left_alone": self.left,
            "invalid": self.invalid,
        }


def plan_offsite(
    settings: Settings, manifests: list[Manifest], now: datetime | None = None
) -> RetentionPlan:
    now = now or utc_now()
    plan = retention_for(settings.backup).plan((candidate(m) for m in manifests), now=now)
    days = settings.offsite.retention_days
    if days is not None:
        horizon = now - timedelta(days=days)
        for doomed in list(plan.delete):
            if doomed.utc >= horizon:
                plan.delete.remove(doomed)
                plan.keep.setdefault(doomed.id, []).append(f"within OFFSITE_RETENTION ({days}d)")
    return plan


def prune_offsite(
    settings: Settings,
    *,
    dry_run: bool = False,
    s3: BaseClient | None = None,
    now: datetime | None = None,
) -> OffsitePrune:
    offsite = settings.offsite
    s3 = s3 if s3 is not None else client(offsite)
    manifests, invalid = offsite_backups(settings, s3)
    result = OffsitePrune(plan_offsite(settings, manifests, now), invalid=invalid, dry_run=dry_run)
    if dry_run:
        return result
    by_id = {m.id: m for m in manifests}
    with store_errors(offsite):
        for doomed in result.plan.delete:
            manifest = by_id[doomed.id]
            keys = [manifest_key(offsite, manifest.database, manifest.id)]
            keys += [key for _, key in data_keys(offsite, manifest)]
            for key in keys:
                if _ours(s3, offsite.bucket, key, manifest.id):
                    s3.delete_object(Bucket=offsite.bucket, Key=key)
                else:
                    result.left.append(key)
            result.deleted.append(doomed.id)
            log.info("off-host retention deleted backup %s", doomed.id)
    if result.left:
        log.warning(
            "off-host retention left %d object(s) dbops did not write: %s",
            len(result.left),
            ", ".join(result.left[:5]),
        )
    return result


def _ours(s3: BaseClient, bucket: str, key: str, backup_id: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return False
        raise
    return bool(head.get("Metadata", {}).get(META_BACKUP) == backup_id)
