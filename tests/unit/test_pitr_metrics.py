"""``dbops_pitr_*`` from a status snapshot and the drill state, without Barman or a server."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from ops.pitr.barman import BackupInfo
from ops.pitr.metrics import PitrCollector, schedule_interval_seconds
from ops.pitr.settings import PitrSettings
from ops.pitr.state import DrillRecord, record_drill
from ops.pitr.status import PitrStatus, SlotState

NEWEST = BackupInfo("20261128T020000", "DONE", 1000.0, 1090.0, 5_000_000, 0)


def scrape(settings: PitrSettings, status: PitrStatus | None) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(PitrCollector(settings, lambda: status, lambda: NEWEST, lambda: False))
    values = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_snapshot_becomes_streaming_slot_backup_and_window_metrics(tmp_path: Path) -> None:
    status = PitrStatus(
        gathered_at=2000.0,
        streaming=True,
        slot=SlotState(
            "dbops_barman",
            exists=True,
            active=True,
            wal_status="extended",
            retained_bytes=3 * 1024**2,
        ),
        current_lsn="0/5000000",
        cap_bytes=64 * 1024**2,
        lag_bytes=0,
        lag_seconds=0.25,
        last_wal_archived="000000010000000000000004",
        last_wal_archived_at=1500.0,
        backups=[
            BackupInfo("20261127T020000", "DONE", None, 900.0, 4_000_000, 0),
            BackupInfo("20261128T010000", "FAILED", None, None, 0, 0),
            BackupInfo("20261128T020000", "DONE", None, 1090.0, 5_000_000, 0),
        ],
        failed_checks={"wal_maximum_age": "too old"},
    )
    values = scrape(PitrSettings(directory=tmp_path), status)
    assert values["dbops_pitr_streaming_up"] == 1.0
    assert values['dbops_pitr_slot_status{wal_status="extended"}'] == 1.0
    assert values['dbops_pitr_slot_status{wal_status="lost"}'] == 0.0
    assert values["dbops_pitr_slot_retained_bytes"] == 3 * 1024**2
    assert values["dbops_pitr_slot_max_retained_bytes"] == 64 * 1024**2
    assert values["dbops_pitr_wal_lag_seconds"] == 0.25
    assert values["dbops_pitr_base_backups_retained"] == 2.0
    assert values["dbops_pitr_base_backup_last_success_timestamp_seconds"] == 1090.0
    assert values["dbops_pitr_base_backup_last_duration_seconds"] == 90.0
    assert values["dbops_pitr_recovery_window_start_timestamp_seconds"] == 900.0
    assert values["dbops_pitr_recovery_window_end_timestamp_seconds"] == 1500.0
    assert values['dbops_pitr_check_failed{check="wal_maximum_age"}'] == 1.0
    assert values["dbops_pitr_check_failures"] == 1.0
    assert "dbops_pitr_drill_last_ok" not in values  # no drill has run
    assert values["dbops_pitr_drill_last_success_timestamp_seconds"] == 0.0


def test_no_snapshot_yet_exports_no_streaming_or_window_values(tmp_path: Path) -> None:
    values = scrape(PitrSettings(directory=tmp_path), None)
    assert "dbops_pitr_streaming_up" not in values
    assert "dbops_pitr_recovery_window_start_timestamp_seconds" not in values
    assert values["dbops_pitr_base_backup_interval_seconds"] == 86400.0


def test_unlimited_slot_cap_exports_no_cap_rather_than_zero(tmp_path: Path) -> None:
    status = PitrStatus(
        gathered_at=0.0, current_lsn="0/1", cap_bytes=None, slot=SlotState("s", exists=False)
    )
    values = scrape(PitrSettings(directory=tmp_path), status)
    assert "dbops_pitr_slot_max_retained_bytes" not in values
    assert values['dbops_pitr_slot_status{wal_status="missing"}'] == 1.0
    assert values["dbops_pitr_streaming_up"] == 0.0


def test_a_failed_drill_after_a_good_one_keeps_the_last_success(tmp_path: Path) -> None:
    settings = PitrSettings(directory=tmp_path)
    record_drill(settings.state_file, DrillRecord(at=100.0, ok=True, seconds=30.0))
    record_drill(settings.state_file, DrillRecord(at=200.0, ok=False, seconds=5.0, error="x"))
    values = scrape(settings, None)
    assert values["dbops_pitr_drill_last_ok"] == 0.0
    assert values["dbops_pitr_drill_last_success_timestamp_seconds"] == 100.0
    assert values["dbops_pitr_drill_last_run_timestamp_seconds"] == 200.0
    assert values["dbops_pitr_drill_last_duration_seconds"] == 5.0


def test_schedule_intervals() -> None:
    assert schedule_interval_seconds("0 2 * * *") == 86400.0
    assert schedule_interval_seconds("*/15 * * * *") == 900.0
    assert schedule_interval_seconds("30 5 * * 0") == 7 * 86400.0
