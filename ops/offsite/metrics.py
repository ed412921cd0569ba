"""``dbops_offsite_*``: what the store holds and what is still owed to it.

One collector for every kind of off-host copy: WAL and base backups come from the shipper's
queue and status; the logical dumps' shipping plugs in a :data:`DumpSource` (a callable
returning queued files, queued bytes and the last shipped dump's time) and shares
:class:`OffsiteCounters` for its failures (``counters.failures.labels("dump", kind).inc()``).
Scrapes read files and in-memory status only: never the store. No label holds a key, a URL
or a bucket name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ops.offsite.store import CREDENTIALS, NO_BUCKET, OTHER, SERVER, UNREACHABLE
from ops.offsite.wal import SEGMENT, missing_count

if TYPE_CHECKING:
    from ops.offsite.dumps import DumpShipping
    from ops.offsite.shipper import Shipper

WAL, BASEBACKUP, DUMP = "wal", "basebackup", "dump"
WHATS = (WAL, BASEBACKUP, DUMP)
KINDS = (UNREACHABLE, CREDENTIALS, NO_BUCKET, SERVER, OTHER)


DumpSource = Callable[[], "DumpShipping"]


class OffsiteCounters:
    """Counters shared by every shipper of the process (WAL, base backups, dumps)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.failures = Counter(
            "dbops_offsite_upload_failures",
            "Failed uploads to the off-host store, by what and kind of failure.",
            ["what", "kind"],
            registry=registry,
        )
        for what in WHATS:
            for kind in KINDS:
                self.failures.labels(what, kind)


class OffsiteCollector(Collector):
    def __init__(self, shipper: Shipper | None, dumps: DumpSource | None = None) -> None:
        self.shipper = shipper
        self.dumps = dumps

    def collect(self) -> Iterator[GaugeMetricFamily]:
        files = GaugeMetricFamily(
            "dbops_offsite_queue_files", "Files waiting for the off-host store.", labels=["what"]
        )
        size = GaugeMetricFamily(
            "dbops_offsite_queue_bytes", "Bytes waiting for the off-host store.", labels=["what"]
        )
        if self.shipper is not None:
            yield from self._shipper(self.shipper, files, size)
        if self.dumps is not None:
            dumps = self.dumps()
            files.add_metric([DUMP], float(dumps.queued_files))
            size.add_metric([DUMP], float(dumps.queued_bytes))
            yield GaugeMetricFamily(
                "dbops_offsite_dump_last_shipped_timestamp_seconds",
                "When the newest verified logical dump was copied to the off-host store "
                "(0: never).",
                value=dumps.last_shipped or 0.0,
            )
        yield files
        yield size

    def _shipper(
        self, shipper: Shipper, files: GaugeMetricFamily, size: GaugeMetricFamily
    ) -> Iterator[GaugeMetricFamily]:
        status = shipper.status
        wals = shipper.queue.wals()
        backups = shipper.queue.backups()
        state = shipper.queue.state()
        files.add_metric([WAL], float(len(wals)))
        size.add_metric([WAL], float(sum(item.size_bytes for item in wals)))
        files.add_metric([BASEBACKUP], float(len(backups)))
        size.add_metric([BASEBACKUP], float(sum(item.size_bytes for item in backups)))
        yield GaugeMetricFamily(
            "dbops_offsite_archive_timeout_seconds",
            "PITR_ARCHIVE_TIMEOUT: how often a written WAL segment is closed and archived.",
            value=shipper.pitr.archive_timeout,
        )
        if status.store_ok is not None:
            yield GaugeMetricFamily(
                "dbops_offsite_store_up",
                "1 when the off-host store took the last upload or check, 0 when it failed.",
                value=1.0 if status.store_ok else 0.0,
            )
        shipped_at = state.get("last_shipped_wal_at")
        yield GaugeMetricFamily(
            "dbops_offsite_wal_last_shipped_timestamp_seconds",
            "When the newest WAL segment in the store was archived here (0: none).",
            value=float(shipped_at) if isinstance(shipped_at, int | float) else 0.0,
        )
        segments = [item for item in wals if SEGMENT.match(item.name)]
        yield GaugeMetricFamily(
            "dbops_offsite_wal_lag_seconds",
            "How long the oldest archived WAL segment not yet in the store has waited "
            "(0: all shipped; idle time without new WAL never counts).",
            value=max(0.0, time.time() - segments[0].archived_at) if segments else 0.0,
        )
        yield GaugeMetricFamily(
            "dbops_offsite_wal_lag_segments",
            "Archived WAL segments not yet in the store.",
            value=float(len(segments)),
        )
        if status.gaps_checked_at is not None:
            yield GaugeMetricFamily(
                "dbops_offsite_wal_gaps",
                "WAL segments missing inside the store's sequence (0: none).",
                value=float(missing_count(status.gaps)),
            )
        backup_end = state.get("last_shipped_backup_end")
        yield GaugeMetricFamily(
            "dbops_offsite_basebackup_last_shipped_timestamp_seconds",
            "When the newest base backup in the store ended (0: none shipped).",
            value=float(backup_end) if isinstance(backup_end, int | float) else 0.0,
        )
        if status.backups_offsite is not None:
            yield GaugeMetricFamily(
                "dbops_offsite_recovery_window_start_timestamp_seconds",
                "The earliest point recoverable from the store alone (0: no base backup there).",
                value=status.window_start or 0.0,
            )
