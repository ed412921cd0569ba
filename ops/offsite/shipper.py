"""Off-host shipping of WAL and base backups: notice what Barman archived, queue it, and drain
the queue to the store in order, whatever the store does.

How new files are noticed: by a scan of Barman's archive after each ``barman cron`` and
``archive-wal`` the sidecar runs (and on the worker's own beat), not by Barman hook scripts.
Barman only archives when the sidecar runs it, so the scan sees every file; it is idempotent
(``state.json`` remembers the newest WAL and the backups already queued), so a crash between
Barman archiving and us queueing loses nothing; and it adds no program to Barman's own path
that could fail or block it.

The worker is one thread: WAL files in segment order, a base backup once no WAL up to its end
is still queued. A failed upload stays first in line and is retried with exponential backoff
(5 s to 5 min). Streaming and local backups never wait for it. Every few minutes, and after
each shipped base backup, the worker lists the store: the off-host recovery window, gaps in
the WAL sequence, and retention.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ops.offsite.cloud import BarmanCloud
from ops.offsite.metrics import BASEBACKUP, WAL, OffsiteCounters
from ops.offsite.queue import QueuedBackup, QueuedWal, UploadQueue
from ops.offsite.settings import OffsiteSettings
from ops.offsite.store import StoreError, check, classify, listed_objects
from ops.offsite.wal import Gap, gaps, is_wal_name, missing_count, name_of_object, sort_key
from ops.pitr.settings import SERVER_NAME, PitrSettings

log = logging.getLogger(__name__)

BACKOFF_FIRST, BACKOFF_MAX = 5.0, 300.0
MAINTENANCE_INTERVAL = 300.0  # list the store: window, gaps
RETENTION_INTERVAL = 3600.0  # and apply retention (and after each shipped base backup)
IDLE_WAIT = 5.0


def backoff(failures: int, first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX) -> float:
    """Seconds to wait after ``failures`` failures in a row: 5, 10, 20, … up to 5 minutes."""
    if failures <= 0:
        return 0.0
    return float(min(cap, first * 2 ** min(failures - 1, 30)))


def ready_backup(wals: list[QueuedWal], backups: list[QueuedBackup]) -> QueuedBackup | None:
    """The oldest queued base backup whose WAL (up to its end) is all shipped: a base backup
    in the store is restorable from the moment it is listed there."""
    for backup in backups:
        if not wals or (
            backup.end_wal is not None and sort_key(wals[0].name) > sort_key(backup.end_wal)
        ):
            return backup
    return None


def next_item(
    wals: list[QueuedWal], backups: list[QueuedBackup]
) -> QueuedWal | QueuedBackup | None:
    """What one worker ships next: a ready base backup, else the oldest WAL."""
    return ready_backup(wals, backups) or (wals[0] if wals else None)


def archived_files(pitr: PitrSettings) -> list[tuple[str, Path]]:
    """Every WAL file Barman's catalogue lists, with its path in the archive."""
    wals = pitr.barman_home / SERVER_NAME / "wals"
    found: list[tuple[str, Path]] = []
    for catalogue in sorted(wals.glob("*xlog.db")):
        try:
            lines = catalogue.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            name = line.split("\t", 1)[0].split(" ", 1)[0]
            if not is_wal_name(name):
                continue
            hash_dir = "" if name.endswith(".history") else name[:16]
            found.append((name, wals / hash_dir / name if hash_dir else wals / name))
    return found


def read_backup_info(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def timestamp(text: str | None) -> float | None:
    if not text or text == "None":
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


@dataclass
class OffsiteStatus:
    store_ok: bool | None = None  # None: not checked yet
    store_detail: str = "not checked yet"
    store_kind: str | None = None
    last_error: str | None = None
    failures_in_row: int = 0  # of the WAL worker
    backup_failures_in_row: int = 0  # of the base backup worker
    window_start: float | None = None
    backups_offsite: int | None = None
    gaps: list[Gap] = field(default_factory=list)
    gaps_checked_at: float | None = None


class Shipper:
    def __init__(
        self, offsite: OffsiteSettings, pitr: PitrSettings, counters: OffsiteCounters
    ) -> None:
        self.offsite = offsite
        self.pitr = pitr
        self.counters = counters
        self.queue = UploadQueue(offsite.directory)
        self.cloud = BarmanCloud(offsite, pitr.barman)
        self.status = OffsiteStatus()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._maintained_at = 0.0
        self._retained_at = 0.0
        self._maintain_soon = True

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.queue.prepare()
        # WAL has a worker of its own, so an hours-long base backup upload never holds the
        # WAL behind it; the base backup worker waits for the WAL its backup needs.
        self._threads = [
            threading.Thread(target=self._run, name="offsite-wal", daemon=True),
            threading.Thread(target=self._run_backups, name="offsite-base", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both workers; an upload still running is left to finish or die with the
        process (its item stays queued until the store has it)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def alive(self) -> bool:
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    # -- noticing ------------------------------------------------------------------------------

    def scan(self) -> None:
        """Queue what Barman archived since the last scan; cheap, called after every archive
        step. A failure to queue is logged and retried by the next scan, never raised into
        the PITR job that called it."""
        try:
            queued = self.queue.enqueue_wals(archived_files(self.pitr))
            fresh_backups = self._enqueue_backups()
        except OSError as error:
            log.error("offsite: queueing failed: %s", error.strerror or error)
            return
        if queued or fresh_backups:
            self._wake.set()

    def _enqueue_backups(self) -> int:
        server = self.pitr.barman_home / SERVER_NAME
        base = server / "base"
        count = 0
        for directory in sorted(base.iterdir()) if base.is_dir() else ():
            # Barman 3.19 keeps backup.info in meta/; older ones in the backup's directory.
            info_path = server / "meta" / f"{directory.name}-backup.info"
            if not info_path.is_file():
                info_path = directory / "backup.info"
            info = read_backup_info(info_path)
            if info.get("status") != "DONE":
                continue
            end_wal = info.get("end_wal")
            if self.queue.enqueue_backup(
                directory.name,
                directory,
                info_path,
                end_wal if end_wal and is_wal_name(end_wal) else None,
                timestamp(info.get("end_time")),
            ):
                log.info("offsite: base backup %s queued", directory.name)
                count += 1
        return count

    # -- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        self._check_store()
        while not self._stop.is_set():
            try:
                self.scan()
                wals = self.queue.wals()
                shipped = self.ship(wals[0]) if wals else None
                if shipped is None:
                    self._maintain_if_due()
                    self._wake.wait(IDLE_WAIT)
                    self._wake.clear()
                elif not shipped:
                    self._stop.wait(backoff(self.status.failures_in_row))
            except Exception as error:  # one bad turn never ends shipping
                log.error("offsite: WAL shipping turn failed: %s", type(error).__name__)
                self._stop.wait(BACKOFF_FIRST)

    def _run_backups(self) -> None:
        while not self._stop.is_set():
            try:
                backup = ready_backup(self.queue.wals(), self.queue.backups())
                shipped = self.ship(backup) if backup is not None else None
                if shipped is None:
                    self._stop.wait(IDLE_WAIT)
                elif not shipped:
                    self._stop.wait(backoff(self.status.backup_failures_in_row))
            except Exception as error:
                log.error("offsite: base backup shipping turn failed: %s", type(error).__name__)
                self._stop.wait(BACKOFF_FIRST)

    def _check_store(self) -> None:
        try:
            result = check(self.offsite)
        except Exception as error:
            problem = classify(error, self.offsite)
            self._store(False, str(problem), problem.kind)
            return
        self._store(result.ok, result.detail, result.kind)

    def _store(self, ok: bool, detail: str, kind: str | None) -> None:
        changed = ok != self.status.store_ok or detail != self.status.store_detail
        self.status.store_ok, self.status.store_detail, self.status.store_kind = ok, detail, kind
        if changed:
            if ok:
                log.info("offsite: store %s: %s", self.offsite.url, detail)
            else:
                log.error("offsite: store %s: %s", self.offsite.url, detail)

    def ship_one(self) -> bool | None:
        """Ship the next item as one worker would: True when shipped, False when it failed
        (it stays queued), None when the queue is empty."""
        item = next_item(self.queue.wals(), self.queue.backups())
        return None if item is None else self.ship(item)

    def ship(self, item: QueuedWal | QueuedBackup) -> bool:
        """Upload one queued item; it leaves the queue only once the store has it."""
        what = WAL if isinstance(item, QueuedWal) else BASEBACKUP
        name = item.name if isinstance(item, QueuedWal) else item.id
        started = time.monotonic()
        try:
            if isinstance(item, QueuedWal):
                self.cloud.archive_wal(item.path)
            else:
                self.cloud.upload_backup(item.id, item.path)
        except StoreError as error:
            if what == WAL:
                self.status.failures_in_row += 1
                attempt = self.status.failures_in_row
            else:
                self.status.backup_failures_in_row += 1
                attempt = self.status.backup_failures_in_row
            self.status.last_error = str(error)
            self.counters.failures.labels(what, error.kind).inc()
            self._store(False, str(error), error.kind)
            log.warning(
                "offsite: shipping %s %s failed (%s, attempt %d, next in %.0fs): %s",
                what,
                name,
                error.kind,
                attempt,
                backoff(attempt),
                error,
            )
            return False
        if isinstance(item, QueuedWal):
            self.queue.update_state(
                last_shipped_wal=item.name, last_shipped_wal_at=item.archived_at
            )
            self.queue.done_wal(item)
            log.debug("offsite: WAL %s shipped", item.name)
        else:
            self.queue.update_state(
                last_shipped_backup=item.id, last_shipped_backup_end=item.end_time
            )
            self.queue.done_backup(item)
            self._maintain_soon = True
            log.info(
                "offsite: base backup %s shipped: %.1f MB in %.1fs",
                item.id,
                item.size_bytes / 1e6,
                time.monotonic() - started,
            )
        if self.status.failures_in_row or self.status.backup_failures_in_row:
            log.info("offsite: store answers again; catching up in order")
        if what == WAL:
            self.status.failures_in_row = 0
        else:
            self.status.backup_failures_in_row = 0
        self.status.last_error = None
        if not self.status.store_ok:
            self._store(True, f"bucket {self.offsite.bucket} reachable", None)
        return True

    # -- what the store holds ------------------------------------------------------------------

    def _maintain_if_due(self) -> None:
        if not self._maintain_soon and time.time() - self._maintained_at < MAINTENANCE_INTERVAL:
            return
        retain = self._maintain_soon or time.time() - self._retained_at >= RETENTION_INTERVAL
        self._maintain_soon = False
        self._maintained_at = time.time()
        try:
            if retain:
                self.apply_retention()
                self._retained_at = time.time()
            self.inspect()
        except StoreError as error:
            self._store(False, str(error), error.kind)
            return
        self._store(True, f"bucket {self.offsite.bucket} reachable", None)

    def inspect(self) -> None:
        """The off-host recovery window and the gaps in its WAL sequence (logged, never
        hidden: each check that finds one says so)."""
        backups = [b for b in self.cloud.backups() if b.get("status") == "DONE"]
        self.status.backups_offsite = len(backups)
        ends = [timestamp(str(b.get("end_time_iso") or "")) for b in backups]
        known = [end for end in ends if end is not None]
        self.status.window_start = min(known) if known else None
        begins = sorted(
            (str(b["begin_wal"]) for b in backups if is_wal_name(str(b.get("begin_wal")))),
            key=sort_key,
        )
        found = gaps(self.offsite_wals(), since=begins[0] if begins else None)
        self.status.gaps = found
        self.status.gaps_checked_at = time.time()
        if found:
            log.error(
                "offsite: %d WAL segment(s) missing in the store: %s",
                missing_count(found),
                "; ".join(str(gap) for gap in found[:5]),
            )

    def offsite_wals(self) -> list[str]:
        """The WAL names the store holds for server ``dbops`` (strays ignored)."""
        prefix = self.offsite.key(SERVER_NAME, "wals") + "/"
        listed = (name_of_object(key) for key, _ in listed_objects(self.offsite, prefix))
        return [name for name in listed if name is not None]

    def apply_retention(self) -> None:
        days = self.offsite.retention_days or self.pitr.retention_days
        self.cloud.delete_by_policy(days, self.pitr.min_redundancy)
