"""The sidecar's dump shipping: a job that scans, ships the queue and applies retention.

It is added only when ``OFFSITE_S3_URL`` is set (see :func:`ops.daemon.build_components`).
:meth:`DumpShippingService.verified` is the hook the backup service calls when a restore drill
passes: the backup is queued and the job woken at once. The job also runs every
``SHIP_INTERVAL`` seconds: a catch-up scan queues verified backups not yet shipped (a drill run
from the CLI, a sidecar that was down, a store that was just configured), then the queue is
shipped in order unless the last failure's backoff is still running. Nothing here blocks the
backup jobs: they share only the backup's read lock, which shipping takes without waiting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

from apscheduler.schedulers.base import BaseScheduler
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ops.backup.manifest import BackupDirectory, Manifest
from ops.memory import release_freed_memory
from ops.offsite.dumps import (
    DumpShipping,
    OnFailure,
    catch_up,
    enqueue,
    ship_pending,
    shipping_state,
)
from ops.offsite.settings import OffsiteSettings
from ops.offsite.store import StoreError
from ops.settings import Settings

log = logging.getLogger(__name__)

SHIP_JOB = "dbops-offsite-dumps"
SHIP_INTERVAL = 60  # seconds between catch-up scans (a failed upload waits its backoff too)


class DumpShippedCollector(Collector):
    """``dbops_offsite_dump_last_shipped_timestamp_seconds`` from the queue on disk (0 until a
    first dump is shipped), so a CLI or an earlier process's copies count too."""

    def __init__(self, offsite: OffsiteSettings) -> None:
        self.offsite = offsite

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = shipping_state(self.offsite)
        yield GaugeMetricFamily(
            "dbops_offsite_dump_last_shipped_timestamp_seconds",
            "When the newest verified logical dump was copied to the off-host store (0: never).",
            value=state.last_shipped or 0.0,
        )


class DumpShippingService:
    """``registry``: where :class:`DumpShippedCollector` goes (``None`` when the shared
    off-host metrics export the family); ``on_failure``: called with the kind of each failed
    upload (the shared ``dbops_offsite_upload_failures_total{what="dump"}``)."""

    name = "offsite-dumps"

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        on_failure: OnFailure | None = None,
    ) -> None:
        self.settings = settings
        self.on_failure = on_failure
        self._cancel = threading.Event()
        self._scheduler: BaseScheduler | None = None
        self._store = BackupDirectory(settings.backup.directory, cache=True)
        if registry is not None:
            registry.register(DumpShippedCollector(settings.offsite))

    # -- Component protocol -------------------------------------------------------------------
    def start(self, scheduler: BaseScheduler) -> None:
        self._scheduler = scheduler
        scheduler.add_job(
            self.ship_job,
            "interval",
            seconds=SHIP_INTERVAL,
            id=SHIP_JOB,
            name="off-host dump copies",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
            replace_existing=True,
        )

    def health_problems(self) -> list[str]:
        return []  # the store's state is a metric and an alert, never a reason to restart us

    def stop(self) -> None:
        self._cancel.set()

    # -- hooks --------------------------------------------------------------------------------
    def verified(self, manifest: Manifest) -> None:
        """The backup service's hook after a passing drill: queue it, ship now."""
        try:
            if enqueue(self.settings, manifest):
                self.wake()
        except OSError as error:
            log.error("cannot queue backup %s for the off-host store: %s", manifest.id, error)

    def wake(self) -> None:
        if self._scheduler is not None and not self._cancel.is_set():
            job = self._scheduler.get_job(SHIP_JOB)
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC))

    def state(self) -> DumpShipping:
        return shipping_state(self.settings.offsite)

    # -- the job ------------------------------------------------------------------------------
    def ship_job(self) -> None:
        try:
            catch_up(self.settings, self._store)
            report = ship_pending(self.settings, on_failure=self.on_failure, cancel=self._cancel)
            if report.shipped:
                self._retention()
        except OSError as error:  # an unreadable BACKUP_DIR or OFFSITE_DIR: one line
            log.error("off-host dump copies not attempted: %s", error)
        except Exception:
            log.exception("off-host dump copies failed unexpectedly")
        finally:
            release_freed_memory()

    def _retention(self) -> None:
        from ops.offsite.dumpretention import prune_offsite

        try:
            result = prune_offsite(self.settings)
        except StoreError as error:
            log.error("off-host retention not applied: %s", error)
            return
        if result.deleted:
            log.info(
                "off-host retention deleted %d backup(s): %s",
                len(result.deleted),
                ", ".join(result.deleted),
            )
