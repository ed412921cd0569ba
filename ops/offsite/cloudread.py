"""Barman Cloud's read side, as command-line tools: list the store's base backups, restore one,
fetch one WAL file. And what the store holds of WAL, read with boto3 (Barman Cloud has no
command that lists WAL).

The programs sit beside ``barman`` (``PITR_BARMAN``'s directory: ``/opt/barman/bin`` in the
image, ``.venv-barman/bin`` on a host). The store's credentials reach them only through their
environment (:meth:`OffsiteSettings.environment`), never their arguments.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ops.offsite.cloud import BarmanCloud
from ops.offsite.settings import OffsiteSettings
from ops.offsite.store import StoreError, listed_objects
from ops.pitr.barman import BackupInfo
from ops.pitr.settings import SERVER_NAME

# A WAL segment or a timeline history file as Barman Cloud stores it (compressed or not).
_WAL_OBJECT = re.compile(
    r"^(?P<name>[0-9A-F]{24}(?:\.partial)?|[0-9A-F]{8}\.history)(?:\.(?:gz|bz2|xz|snappy|lz4|zst))?$"
)
LIST_TIMEOUT = 300.0


class CloudError(Exception):
    """A Barman Cloud command failed; the message is the one line worth showing."""


@dataclass(frozen=True)
class StoredWal:
    name: str  # 000000010000000000000003, 00000002.history, …partial
    key: str
    uploaded_at: float

    @property
    def is_segment(self) -> bool:
        return len(self.name) == 24


class CloudReader:
    """The ``barman-cloud-*`` programs for the server ``dbops`` under ``OFFSITE_S3_URL``, run
    as the shipper runs them (:class:`ops.offsite.cloud.BarmanCloud`), failures as
    :class:`CloudError`."""

    def __init__(self, offsite: OffsiteSettings, bindir: Path) -> None:
        assert offsite.url is not None
        self.offsite = offsite
        self._cloud = BarmanCloud(offsite, bindir / "barman", bounded_retries=False)

    def program(self, name: str) -> Path:
        return self._cloud.program(name)

    def common_args(self) -> list[str]:
        """Options every barman-cloud command takes; path-style addressing for a self-hosted
        endpoint (a host name such as ``objectstore`` has no bucket subdomains)."""
        return ["--cloud-provider", "aws-s3", *self._cloud.common_options()]

    def run(self, name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            return self._cloud.run(name, list(args), timeout=timeout)
        except StoreError as error:
            raise CloudError(str(error)) from None

    # -- what the store holds --------------------------------------------------------------

    def backups(self) -> list[BackupInfo]:
        """The store's base backups, oldest first (``barman-cloud-backup-list``)."""
        assert self.offsite.url is not None
        result = self.run(
            "backup-list", "--format", "json", self.offsite.url, SERVER_NAME, timeout=LIST_TIMEOUT
        )
        try:
            listed = json.loads(result.stdout).get("backups_list", [])
        except (ValueError, AttributeError):
            raise CloudError("barman-cloud-backup-list: the answer is not JSON") from None
        backups = [stored_backup(entry) for entry in listed if isinstance(entry, dict)]
        backups.sort(key=lambda backup: backup.id)
        return backups

    def wal_files(self) -> list[StoredWal]:
        """Every WAL segment and history file under ``<prefix>/dbops/wals/`` (boto3)."""
        prefix = self.offsite.key(SERVER_NAME, "wals") + "/"
        found: list[StoredWal] = []
        try:
            for key, uploaded_at in listed_objects(self.offsite, prefix):
                if match := _WAL_OBJECT.match(key.rsplit("/", 1)[-1]):
                    found.append(StoredWal(match.group("name"), key, uploaded_at))
        except StoreError as error:
            raise CloudError(f"listing the store's WAL: {error}") from None
        found.sort(key=lambda wal: wal_order(wal.name))
        return found

    # -- restoring ---------------------------------------------------------------------------

    def restore(self, backup_id: str, destination: Path, timeout: float) -> None:
        assert self.offsite.url is not None
        self.run(
            "restore", self.offsite.url, SERVER_NAME, backup_id, str(destination), timeout=timeout
        )

    def fetch_wal(self, name: str, destination: Path, timeout: float = 600.0) -> None:
        assert self.offsite.url is not None
        self.run(
            "wal-restore", self.offsite.url, SERVER_NAME, name, str(destination), timeout=timeout
        )


def wal_order(name: str) -> tuple[str, str]:
    """Segments in replay order across timelines (log and segment first, then timeline);
    history files sort by their timeline before every segment."""
    if len(name) >= 24:
        return (name[8:24], name[:8])
    return ("", name[:8])


def stored_backup(entry: dict[str, Any]) -> BackupInfo:
    """One ``backups_list`` entry as the :class:`BackupInfo` the local catalogue gives."""

    def timestamp(key: str) -> float | None:
        value = entry.get(f"{key}_iso")
        if not value:
            return None
        try:
            return datetime.fromisoformat(str(value)).timestamp()
        except ValueError:
            return None

    timeline = entry.get("timeline")
    return BackupInfo(
        id=str(entry.get("backup_id")),
        status=str(entry.get("status") or "UNKNOWN"),
        begin_time=timestamp("begin_time"),
        end_time=timestamp("end_time"),
        size_bytes=int(entry.get("size") or 0),
        wal_size_bytes=0,
        begin_wal=entry.get("begin_wal"),
        end_wal=entry.get("end_wal"),
        begin_lsn=entry.get("begin_xlog"),
        end_lsn=entry.get("end_xlog"),
        timeline=int(timeline) if isinstance(timeline, int) else None,
    )
