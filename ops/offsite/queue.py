"""The upload queue on the sidecar's volume (``OFFSITE_DIR``): what Barman has archived and the
store does not hold yet.

An item is a hard link to Barman's own file (a copy when the queue is on another filesystem),
so Barman's retention can remove its name without taking the queued bytes with it, and the
queue lives on the sidecar's volume, never on PostgreSQL's. Items appear atomically (built
under a temporary name, then renamed) and leave only once uploaded: a restart finds exactly
what is still owed. ``state.json`` remembers the newest WAL and the backups already queued,
so a scan of Barman's archive queues each one once.

Layout::

    OFFSITE_DIR/queue/wal/<segment or history name>
    OFFSITE_DIR/queue/base/<backup id>/{item.json, backup.info, data/…}
    OFFSITE_DIR/state.json
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ops.offsite.wal import is_wal_name, sort_key
from ops.pitr.config import write_private
from ops.pitr.state import load_state

log = logging.getLogger(__name__)
_TEMPORARY = ".incoming-"
MAX_REMEMBERED_BACKUPS = 200
_BACKUP_ID = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-")


@dataclass(frozen=True)
class QueuedWal:
    name: str
    path: Path
    size_bytes: int
    archived_at: float  # when Barman wrote the segment (the file's mtime)


@dataclass(frozen=True)
class QueuedBackup:
    id: str
    path: Path
    end_wal: str | None
    end_time: float | None
    size_bytes: int


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


class UploadQueue:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.wal_dir = directory / "queue" / "wal"
        self.base_dir = directory / "queue" / "base"
        self.state_file = directory / "state.json"
        self.lock = threading.RLock()

    def prepare(self) -> None:
        """Create the queue and drop half-built items a killed run left (they are rebuilt
        from Barman's archive: the state says they were never queued)."""
        for directory in (self.directory, self.wal_dir, self.base_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for parent in (self.wal_dir, self.base_dir):
            for leftover in parent.glob(_TEMPORARY + "*"):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)

    # -- state ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        with self.lock:
            return load_state(self.state_file)

    def update_state(self, **values: Any) -> None:
        with self.lock:
            state = load_state(self.state_file)
            state.update(values)
            write_private(self.state_file, json.dumps(state, indent=2, sort_keys=True) + "\n")

    # -- adding --------------------------------------------------------------------------------

    def enqueue_wals(self, archived: Iterable[tuple[str, Path]]) -> list[str]:
        """Queue every archived WAL file newer than the newest already queued on its timeline,
        in order; the names queued. ``archived`` is (name, path in Barman's archive).

        The floor is per timeline: after going back to an earlier timeline, its new segments
        sort below a later timeline's and must still be shipped."""
        with self.lock:
            state = self.state()
            recorded = state.get("last_enqueued_by_timeline")
            floors: dict[str, str] = (
                {k: v for k, v in recorded.items() if isinstance(v, str) and is_wal_name(v)}
                if isinstance(recorded, dict)
                else {}
            )
            fresh = sorted(
                ((name, path) for name, path in archived if is_wal_name(name)),
                key=lambda item: sort_key(item[0]),
            )
            queued: list[str] = []
            for name, source in fresh:
                timeline = name[:8]
                floor = floors.get(timeline)
                if floor is not None and sort_key(name) <= sort_key(floor):
                    continue
                target = self.wal_dir / name
                if not target.exists():
                    temporary = self.wal_dir / f"{_TEMPORARY}{name}"
                    temporary.unlink(missing_ok=True)
                    try:
                        _link_or_copy(source, temporary)
                    except OSError as error:
                        # Not queued and not remembered: the next scan tries again, in order.
                        log.error("offsite: cannot queue WAL %s: %s", name, error.strerror)
                        break
                    os.replace(temporary, target)
                queued.append(name)
                floors[timeline] = name
                self.update_state(last_enqueued_by_timeline=dict(floors))
            return queued

    def enqueue_backup(
        self,
        backup_id: str,
        backup_dir: Path,
        info_path: Path,
        end_wal: str | None,
        end_time: float | None,
    ) -> bool:
        """Queue one completed base backup (its directory as Barman left it, and its
        ``backup.info``); False when it was queued before."""
        if not backup_id or not set(backup_id) <= _BACKUP_ID:
            raise ValueError(f"not a backup id: {backup_id!r}")
        with self.lock:
            remembered = self._remembered_backups()
            if backup_id in remembered or (self.base_dir / backup_id).exists():
                return False
            temporary = self.base_dir / f"{_TEMPORARY}{backup_id}"
            shutil.rmtree(temporary, ignore_errors=True)
            shutil.copytree(backup_dir, temporary, symlinks=True, copy_function=_link_or_copy)
            # backup.info is small and Barman may rewrite it (keep annotations): a real copy.
            info = temporary / "backup.info"
            info.unlink(missing_ok=True)
            shutil.copy2(info_path, info)
            item = {"id": backup_id, "end_wal": end_wal, "end_time": end_time}
            write_private(temporary / "item.json", json.dumps(item) + "\n")
            os.replace(temporary, self.base_dir / backup_id)
            remembered.append(backup_id)
            self.update_state(enqueued_backups=remembered[-MAX_REMEMBERED_BACKUPS:])
            return True

    def _remembered_backups(self) -> list[str]:
        found = self.state().get("enqueued_backups")
        return [str(i) for i in found] if isinstance(found, list) else []

    # -- reading and removing -----------------------------------------------------------------

    def wals(self) -> list[QueuedWal]:
        """Queued WAL files in shipping order."""
        found = []
        for path in self.wal_dir.iterdir() if self.wal_dir.is_dir() else ():
            if not is_wal_name(path.name):
                continue
            try:
                info = path.lstat()
            except OSError:
                continue
            found.append(QueuedWal(path.name, path, info.st_size, info.st_mtime))
        found.sort(key=lambda item: sort_key(item.name))
        return found

    def backups(self) -> list[QueuedBackup]:
        """Queued base backups, oldest first."""
        found = []
        for path in sorted(self.base_dir.iterdir()) if self.base_dir.is_dir() else ():
            if path.name.startswith(_TEMPORARY) or not path.is_dir():
                continue
            item = load_state(path / "item.json")
            end_wal = item.get("end_wal")
            end_time = item.get("end_time")
            found.append(
                QueuedBackup(
                    id=path.name,
                    path=path,
                    end_wal=end_wal if isinstance(end_wal, str) and is_wal_name(end_wal) else None,
                    end_time=float(end_time) if isinstance(end_time, int | float) else None,
                    size_bytes=_tree_size(path),
                )
            )
        return found

    def done_wal(self, item: QueuedWal) -> None:
        with self.lock:
            item.path.unlink(missing_ok=True)

    def done_backup(self, item: QueuedBackup) -> None:
        with self.lock:
            shutil.rmtree(item.path, ignore_errors=True)
