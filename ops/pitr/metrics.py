"""``dbops_pitr_*``: what point-in-time recovery can do, for Prometheus.

Scrapes read the snapshot the supervision job refreshes every ``PITR_CRON_INTERVAL`` (Barman's
JSON, its WAL catalogue, ``pg_replication_slots``) and the drill results in PITR_DIR, so a
scrape never starts Barman or waits on the server. Counters are in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

from apscheduler.triggers.cron import CronTrigger
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ops.pitr.barman import BackupInfo
from ops.pitr.settings import PitrSettings
from ops.pitr.state import last_drill, last_good_drill
from ops.pitr.status import PitrStatus

SLOT_STATES = ("reserved", "extended", "unreserved", "lost", "missing")
RESULTS = ("ok", "failed")


def schedule_interval_seconds(expression: str) -> float:
    """The gap between a cron schedule's next two runs: what "on time" means for it."""
    trigger = CronTrigger.from_crontab(expression, timezone=UTC)
    first = trigger.get_next_fire_time(None, datetime.now(UTC))
    if first is None:
        return 0.0
    second = trigger.get_next_fire_time(first, first + timedelta(seconds=1))
    return (second - first).total_seconds() if second is not None else 0.0


class PitrCounters:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.switches = Counter(
            "dbops_pitr_wal_switches",
            "WAL segments closed by the forced switch.",
            registry=registry,
        )
        self.base_backups = Counter(
            "dbops_pitr_base_backup_runs", "Base backups by result.", ["result"], registry=registry
        )
        self.drills = Counter(
            "dbops_pitr_drill_runs", "PITR drills by result.", ["result"], registry=registry
        )
        self.slot_resets = Counter(
            "dbops_pitr_slot_resets",
            "Times streaming was reset after the slot lost its WAL.",
            registry=registry,
        )
        for result in RESULTS:
            self.base_backups.labels(result)
            self.drills.labels(result)


def slot_state(status: PitrStatus) -> str | None:
    if status.slot is None:
        return None  # the server did not answer: say nothing rather than "missing"
    if not status.slot.exists:
        return "missing"
    return status.slot.wal_status or "reserved"


class PitrCollector(Collector):
    def __init__(
        self,
        settings: PitrSettings,
        snapshot: Callable[[], PitrStatus | None],
        newest_backup: Callable[[], BackupInfo | None],
        backup_in_progress: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.snapshot = snapshot
        self.newest_backup = newest_backup
        self.backup_in_progress = backup_in_progress
        self.base_interval = schedule_interval_seconds(settings.basebackup_schedule)
        self.drill_interval = schedule_interval_seconds(settings.drill_schedule)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, documentation, value=value)

        yield gauge(
            "dbops_pitr_base_backup_interval_seconds",
            "PITR_BASEBACKUP_SCHEDULE as an interval.",
            self.base_interval,
        )
        yield gauge(
            "dbops_pitr_drill_interval_seconds",
            "PITR_DRILL_SCHEDULE as an interval.",
            self.drill_interval,
        )
        yield gauge(
            "dbops_pitr_base_backup_in_progress",
            "1 while a base backup runs here.",
            1.0 if self.backup_in_progress() else 0.0,
        )
        yield from self._drill()
        status = self.snapshot()
        if status is None:
            return  # the first supervision run has not finished: no value is better than 0
        yield from self._streaming(status, gauge)
        yield from self._backups(status, gauge)

    def _streaming(
        self, status: PitrStatus, gauge: Callable[[str, str, float], GaugeMetricFamily]
    ) -> Iterator[GaugeMetricFamily]:
        if status.current_lsn is not None:
            yield gauge(
                "dbops_pitr_streaming_up",
                "1 when WAL streams into the archive through the slot.",
                1.0 if status.streaming else 0.0,
            )
        yield gauge(
            "dbops_pitr_wal_last_archived_timestamp_seconds",
            "When the newest archived WAL segment was closed (0: none).",
            status.last_wal_archived_at or 0.0,
        )
        if status.lag_bytes is not None:
            yield gauge(
                "dbops_pitr_wal_lag_bytes",
                "WAL the server wrote that streaming has not yet flushed.",
                float(status.lag_bytes),
            )
        if status.lag_seconds is not None:
            yield gauge(
                "dbops_pitr_wal_lag_seconds",
                "Age in seconds of the oldest WAL the server wrote that streaming has not "
                "confirmed flushed: 0 when the archive's receiver has flushed all of it, else "
                "the time since its last reply plus the flush lag it reported then (an upper "
                "bound of what a loss of the server would lose).",
                status.lag_seconds,
            )
        state = slot_state(status)
        if state is not None:
            family = GaugeMetricFamily(
                "dbops_pitr_slot_status",
                "The replication slot's wal_status (1 for the current one).",
                labels=["wal_status"],
            )
            for name in SLOT_STATES:
                family.add_metric([name], 1.0 if name == state else 0.0)
            yield family
        if status.slot is not None and status.slot.retained_bytes is not None:
            yield gauge(
                "dbops_pitr_slot_retained_bytes",
                "WAL the server keeps for the slot.",
                float(max(0, status.slot.retained_bytes)),
            )
        if status.cap_bytes is not None:
            yield gauge(
                "dbops_pitr_slot_max_retained_bytes",
                "max_slot_wal_keep_size: past it the server drops the slot's WAL.",
                float(status.cap_bytes),
            )
        family = GaugeMetricFamily(
            "dbops_pitr_check_failed",
            "Failing `barman check` items (1 each; absent when passing).",
            labels=["check"],
        )
        for name in sorted(status.failed_checks):
            family.add_metric([name], 1.0)
        yield family
        yield gauge(
            "dbops_pitr_check_failures",
            "How many `barman check` items fail.",
            float(len(status.failed_checks)),
        )

    def _backups(
        self, status: PitrStatus, gauge: Callable[[str, str, float], GaugeMetricFamily]
    ) -> Iterator[GaugeMetricFamily]:
        good = status.good_backups
        yield gauge(
            "dbops_pitr_base_backups_retained", "Good base backups Barman keeps.", float(len(good))
        )
        newest = self.newest_backup()
        yield gauge(
            "dbops_pitr_base_backup_last_success_timestamp_seconds",
            "When the newest good base backup ended (0: none).",
            max((b.end_time or 0.0 for b in good), default=0.0),
        )
        if newest is not None and newest.begin_time and newest.end_time:
            yield gauge(
                "dbops_pitr_base_backup_last_duration_seconds",
                "How long the newest good base backup took.",
                max(0.0, newest.end_time - newest.begin_time),
            )
            yield gauge(
                "dbops_pitr_base_backup_last_size_bytes",
                "Size of the newest good base backup.",
                float(newest.size_bytes),
            )
        yield gauge(
            "dbops_pitr_recovery_window_start_timestamp_seconds",
            "The earliest point one can recover to (0: none).",
            status.window_start or 0.0,
        )
        yield gauge(
            "dbops_pitr_recovery_window_end_timestamp_seconds",
            "The latest point the archive surely covers (0: none).",
            status.window_end or 0.0,
        )

    def _drill(self) -> Iterator[GaugeMetricFamily]:
        state_file = self.settings.state_file
        last, good = last_drill(state_file), last_good_drill(state_file)
        yield GaugeMetricFamily(
            "dbops_pitr_drill_last_success_timestamp_seconds",
            "When a PITR drill last proved a recovery point (0: never).",
            value=good.at if good else 0.0,
        )
        if last is not None:
            yield GaugeMetricFamily(
                "dbops_pitr_drill_last_run_timestamp_seconds",
                "When the last PITR drill finished.",
                value=last.at,
            )
            yield GaugeMetricFamily(
                "dbops_pitr_drill_last_ok",
                "1 if the last PITR drill proved its recovery point, 0 if it failed.",
                value=1.0 if last.ok else 0.0,
            )
            yield GaugeMetricFamily(
                "dbops_pitr_drill_last_duration_seconds",
                "How long the last PITR drill took: restore, replay to T, checks (the RTO).",
                value=last.seconds,
            )
