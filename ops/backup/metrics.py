"""Backup metrics, derived at scrape time from the manifests in ``BACKUP_DIR``.

Reading the manifests on every scrape is cheap (a manifest is parsed again only when its file
changes) and makes runs of the CLI, of another sidecar or of a previous process show up exactly
like the sidecar's own; only the run counters are in-process.

What the directory holds is not trusted: an invalid manifest is left out and counted
(``dbops_backup_manifests_invalid``), a backup dated in the future is left out of "newest" and
counted (``dbops_backup_manifests_future_dated``), and an unreadable directory yields
``dbops_backup_directory_readable 0`` instead of an error page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ops.backup.manifest import BackupDirectory, Manifest, utc_now
from ops.backup.retention import is_future
from ops.settings import Settings

log = logging.getLogger(__name__)

RUN_RESULTS = ("ok", "failed", "locked")
VERIFY_RESULTS = ("ok", "failed")


def _timestamp(moment: datetime | None) -> float:
    return moment.timestamp() if moment is not None else 0.0


class BackupCounters:
    """The in-process counters, every label value present from the start at zero."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Counter(
            "dbops_backup_runs", "Backup runs by result.", ["result"], registry=registry
        )
        self.verifications = Counter(
            "dbops_backup_verify_runs", "Restore drills by result.", ["result"], registry=registry
        )
        self.pruned = Counter(
            "dbops_backup_pruned", "Backups deleted by retention.", registry=registry
        )
        for result in RUN_RESULTS:
            self.runs.labels(result)
        for result in VERIFY_RESULTS:
            self.verifications.labels(result)


class BackupCollector(Collector):
    def __init__(
        self,
        settings: Settings,
        in_progress: Callable[[], int],
        next_run: Callable[[], datetime | None],
    ) -> None:
        self.settings = settings
        self.store = BackupDirectory(settings.backup.directory, cache=True)
        self.in_progress = in_progress
        self.next_run = next_run
        self._last_error: str | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        database = self.settings.db.database
        now = utc_now()
        readable = 1.0
        try:
            records = [m for m in self.store.manifests() if m.database == database]
            good = self.store.backups(database, records)
            self._last_error = None
        except OSError as error:  # an unreadable BACKUP_DIR must not take /metrics down with it
            if str(error) != self._last_error:  # once per distinct problem, not every scrape
                log.warning("cannot read backup manifests: %s", error)
                self._last_error = str(error)
            records, good, readable = [], [], 0.0
        future = {m.id for m in records if is_future(m.started, now)}
        trusted = [m for m in good if m.id not in future]
        newest: Manifest | None = trusted[-1] if trusted else None
        failures = [m for m in records if not m.ok and m.id not in future]

        def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, documentation, value=value)

        yield gauge(
            "dbops_backup_last_success_timestamp_seconds",
            "When the newest good backup finished (0: none).",
            _timestamp(newest.finished if newest else None),
        )
        yield gauge(
            "dbops_backup_last_duration_seconds",
            "How long the newest good backup took.",
            (newest.duration_seconds or 0.0) if newest else 0.0,
        )
        yield gauge(
            "dbops_backup_last_size_bytes",
            "Size of the newest good backup.",
            float(newest.size_bytes) if newest else 0.0,
        )
        yield gauge(
            "dbops_backup_last_failure_timestamp_seconds",
            "When the newest failed run finished (0: none on record).",
            max((_timestamp(m.finished) for m in failures), default=0.0),
        )
        yield gauge("dbops_backup_retained", "Good backups kept in BACKUP_DIR.", float(len(good)))
        drills = [m.last_success("drill") for m in trusted]
        yield gauge(
            "dbops_backup_oldest_timestamp_seconds",
            "When the oldest good backup kept in BACKUP_DIR finished (0: none).",
            _timestamp(trusted[0].finished if trusted else None),
        )
        yield gauge(
            "dbops_backup_verify_last_success_timestamp_seconds",
            "When a restore drill last succeeded (0: never).",
            max((_timestamp(d) for d in drills if d and not is_future(d, now)), default=0.0),
        )
        yield gauge(
            "dbops_backup_directory_readable",
            "Whether BACKUP_DIR could be listed (0: missing or unreadable).",
            readable,
        )
        yield gauge(
            "dbops_backup_manifests_invalid",
            "Manifests (or their dumps) in BACKUP_DIR skipped as malformed or unsafe.",
            float(len(self.store.invalid)) if readable else 0.0,
        )
        yield gauge(
            "dbops_backup_manifests_future_dated",
            "Manifests of this database dated in the future: not trusted for retention.",
            float(len(future)),
        )
        yield gauge(
            "dbops_backup_max_age_seconds",
            "BACKUP_MAX_AGE: the newest good backup must be younger.",
            self.settings.backup.max_age,
        )
        yield gauge(
            "dbops_backup_in_progress", "Backup runs in progress here.", float(self.in_progress())
        )
        next_run = self.next_run()
        if next_run is not None:
            yield gauge(
                "dbops_backup_next_run_timestamp_seconds",
                "When the scheduler will start the next backup.",
                next_run.timestamp(),
            )
