"""The pure parts of backups: argv and environment of pg_dump, schedule arithmetic, manifests
on disk, the directory lock. No database, no network."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy.engine import make_url

from ops.backup.lock import DirectoryLock, LockHeld
from ops.backup.manifest import (
    STATUS_FAILED,
    STATUS_OK,
    BackupDirectory,
    Manifest,
    Verification,
    checksum_dump,
    new_backup_id,
)
from ops.backup.pgtools import ClientTool, ToolError, check_client_version, libpq_env
from ops.backup.runner import compression_args, pg_dump_command
from ops.backup.service import needs_catch_up, schedule_interval
from ops.backup.verify import scratch_database
from ops.settings import BackupSettings, load_settings, validate_cron

SECRET = "s3cr3t-Pa55"
PG15 = ClientTool("pg_dump", "/usr/bin/pg_dump", "pg_dump (PostgreSQL) 15.18", 15)
PG16 = ClientTool("pg_dump", "/usr/bin/pg_dump", "pg_dump (PostgreSQL) 16.4", 16)


def test_pg_dump_argv_carries_no_connection_details_and_env_carries_the_password() -> None:
    url = make_url(f"postgresql+psycopg2://backup:{SECRET}@db.internal:5433/app?sslmode=require")
    command = pg_dump_command(
        PG15, BackupSettings(format="directory", jobs=3), Path("/b/x"), "00000003-1"
    )
    assert not any(SECRET in part or "db.internal" in part for part in command)
    assert command[1:] == [
        "--format=directory",
        "--file=/b/x",
        "-Z",
        "1",
        "--jobs=3",
        "--snapshot=00000003-1",
    ]
    env = libpq_env(url, "dbops-pg_dump")
    assert env["PGPASSWORD"] == SECRET
    assert (env["PGHOST"], env["PGPORT"], env["PGUSER"], env["PGDATABASE"]) == (
        "db.internal",
        "5433",
        "backup",
        "app",
    )
    assert env["PGSSLMODE"] == "require"
    assert env["PGAPPNAME"] == "dbops-pg_dump"
    assert env["PGCONNECT_TIMEOUT"] == "10"
    assert libpq_env(url, "dbops-pg_dump", 3)["PGCONNECT_TIMEOUT"] == "3"


def test_libpq_env_drops_pg_variables_of_the_calling_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGSERVICE", "elsewhere")
    monkeypatch.setenv("PGPASSWORD", "not-this-one")
    env = libpq_env(make_url("postgresql://u@h/d"))
    assert "PGSERVICE" not in env
    assert "PGPASSWORD" not in env


@pytest.mark.parametrize(
    ("compression", "tool", "expected"),
    [
        ("0", PG15, ["-Z", "0"]),
        ("6", PG15, ["-Z", "6"]),
        ("gzip:3", PG15, ["-Z", "3"]),
        ("none", PG15, ["-Z", "0"]),
        ("zstd:3", PG16, ["--compress=zstd:3"]),
        ("lz4", PG16, ["--compress=lz4"]),
    ],
)
def test_compression_setting_becomes_the_pg_dump_option_of_that_version(
    compression: str, tool: ClientTool, expected: list[str]
) -> None:
    assert compression_args(compression, tool) == expected


def test_zstd_with_a_pg_dump_15_is_refused_clearly() -> None:
    with pytest.raises(ToolError, match="needs pg_dump 16"):
        compression_args("zstd:3", PG15)


def test_client_older_than_server_is_refused_naming_both_versions() -> None:
    check_client_version(PG15, 150004)
    check_client_version(PG16, 150004)
    with pytest.raises(ToolError, match=r"pg_dump 15 .* older than the PostgreSQL 16 server"):
        check_client_version(PG15, 160002)


def test_schedule_interval_of_daily_and_hourly_crons() -> None:
    now = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)
    daily = CronTrigger.from_crontab("0 3 * * *", timezone=UTC)
    hourly = CronTrigger.from_crontab("15 * * * *", timezone=UTC)
    assert schedule_interval(daily, now) == timedelta(days=1)
    assert schedule_interval(hourly, now) == timedelta(hours=1)


def test_catch_up_runs_when_newest_backup_is_older_than_one_interval_or_missing() -> None:
    now = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)
    day = timedelta(days=1)
    assert needs_catch_up(None, day, now)
    assert needs_catch_up(now - timedelta(hours=25), day, now)
    assert not needs_catch_up(now - timedelta(hours=23), day, now)


def test_invalid_backup_schedule_is_a_config_error_naming_the_variable() -> None:
    from db.settings import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_settings({"BACKUP_SCHEDULE": "0 25 * * *", "BACKUP_VERIFY_SCHEDULE": "daily"})
    problems = "\n".join(caught.value.problems)
    assert "BACKUP_SCHEDULE '0 25 * * *': invalid cron" in problems
    assert "BACKUP_VERIFY_SCHEDULE daily" in problems


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("0 3 31 2 *", "never fires"),
        ("0 3 * *", "5-field"),
        ("61 * * * *", "invalid cron expression"),
    ],
)
def test_cron_that_cannot_run_is_rejected(expression: str, reason: str) -> None:
    problem = validate_cron(expression)
    assert problem is not None and reason in problem


def test_leap_day_cron_is_accepted() -> None:
    assert validate_cron("0 3 29 2 *") is None


def test_backup_ids_sort_by_time() -> None:
    early = new_backup_id(datetime(2026, 1, 9, 23, 59, 59, tzinfo=UTC))
    late = new_backup_id(datetime(2026, 1, 10, 0, 0, 0, tzinfo=UTC))
    assert early.startswith("20260109T235959Z-")
    assert early < late


def test_scratch_database_name_is_a_plain_identifier() -> None:
    name = scratch_database("20260109T235959Z-3fa9c1")
    assert name == "dbops_verify_20260109t235959z_3fa9c1"
    assert len(name) <= 63


def _manifest(store: BackupDirectory, backup_id: str, database: str = "app", **kw: object) -> None:
    (store.root / f"{backup_id}.dump").write_bytes(b"PGDMP" + backup_id.encode())
    values: dict[str, object] = {
        "id": backup_id,
        "database": database,
        "format": "custom",
        "compression": "1",
        "status": STATUS_OK,
        "started_at": datetime.strptime(backup_id[:16], "%Y%m%dT%H%M%SZ")
        .replace(tzinfo=UTC)
        .isoformat(),
        "path": f"{backup_id}.dump",
    }
    values.update(kw)
    store.write(Manifest(**values))  # type: ignore[arg-type]


def test_only_good_manifests_of_the_database_with_data_count_as_backups(tmp_path: Path) -> None:
    store = BackupDirectory(tmp_path)
    _manifest(store, "20260101T030000Z-aaaaaa")
    _manifest(store, "20260102T030000Z-bbbbbb", status=STATUS_FAILED, path=None)
    _manifest(store, "20260103T030000Z-cccccc", database="other")
    _manifest(store, "20260104T030000Z-dddddd")
    (tmp_path / "20260104T030000Z-dddddd.dump").unlink()  # data gone: not a backup
    (tmp_path / "20260105T030000Z-eeeeee.json").write_text(json.dumps({"id": "x"}))  # foreign
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "20260106T030000Z-ffffff.json").write_text("{ truncated")
    _manifest(store, "20260107T030000Z-777777", started_at="yesterday-ish")
    assert [m.id for m in store.backups("app")] == ["20260101T030000Z-aaaaaa"]
    assert [m.id for m in store.backups("other")] == ["20260103T030000Z-cccccc"]


def test_cached_listing_parses_a_manifest_again_only_when_its_file_changes(
    tmp_path: Path,
) -> None:
    writer = BackupDirectory(tmp_path)
    _manifest(writer, "20260101T030000Z-aaaaaa", tables={"public.t": 3})
    _manifest(writer, "20260102T030000Z-bbbbbb")
    reader = BackupDirectory(tmp_path, cache=True)
    first = {m.id: m for m in reader.manifests()}
    second = {m.id: m for m in reader.manifests()}
    assert all(second[key] is first[key] for key in first)  # served from the cache
    changed = writer.get("20260101T030000Z-aaaaaa")
    assert changed is not None
    changed.verifications.append(Verification("drill", True, "2026-01-01T04:30:00+00:00", 1.5))
    writer.write(changed)
    writer.delete(first["20260102T030000Z-bbbbbb"])
    third = {m.id: m for m in reader.manifests()}
    assert list(third) == ["20260101T030000Z-aaaaaa"]
    assert third["20260101T030000Z-aaaaaa"].verified
    assert third["20260101T030000Z-aaaaaa"] is not first["20260101T030000Z-aaaaaa"]
    # without the cache every listing parses anew
    plain = BackupDirectory(tmp_path)
    assert plain.manifests()[0] is not plain.manifests()[0]


def test_manifest_round_trips_with_verifications(tmp_path: Path) -> None:
    store = BackupDirectory(tmp_path)
    _manifest(store, "20260101T030000Z-aaaaaa", tables={"public.t": 3})
    manifest = store.get("20260101T030000Z-aaaaaa")
    assert manifest is not None
    manifest.verifications.append(Verification("drill", True, "2026-01-01T04:30:00+00:00", 1.5))
    store.write(manifest)
    again = store.get("20260101T030000Z-aaaaaa")
    assert again is not None and again.verified and again.tables == {"public.t": 3}
    assert again.last_success("drill") == datetime(2026, 1, 1, 4, 30, tzinfo=UTC)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dbops-tmp-")]


def test_a_later_failed_verification_revokes_verified(tmp_path: Path) -> None:
    store = BackupDirectory(tmp_path)
    _manifest(store, "20260101T030000Z-aaaaaa")
    manifest = store.get("20260101T030000Z-aaaaaa")
    assert manifest is not None
    manifest.verifications += [
        Verification("drill", True, "2026-01-01T04:30:00+00:00", 1.0),
        Verification("checksum", False, "2026-01-02T04:30:00+00:00", 0.1, "sha256 mismatch"),
    ]
    assert not manifest.verified


def test_remove_temporaries_touches_only_our_temporary_names(tmp_path: Path) -> None:
    store = BackupDirectory(tmp_path)
    (tmp_path / ".dbops-tmp-20260101T030000Z-aaaaaa.dump").write_bytes(b"partial")
    (tmp_path / ".dbops-tmp-20260101T030000Z-bbbbbb.dir").mkdir()
    (tmp_path / "someone-elses.dump").write_bytes(b"keep me")
    (tmp_path / ".hidden").write_bytes(b"keep me")
    assert sorted(store.remove_temporaries()) == [
        ".dbops-tmp-20260101T030000Z-aaaaaa.dump",
        ".dbops-tmp-20260101T030000Z-bbbbbb.dir",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "someone-elses.dump"]


def test_checksums_cover_every_file_of_a_directory_dump(tmp_path: Path) -> None:
    dump = tmp_path / "x.dir"
    dump.mkdir()
    (dump / "toc.dat").write_bytes(b"toc")
    (dump / "3001.dat.gz").write_bytes(b"data")
    sums = checksum_dump(dump, jobs=2)
    assert set(sums) == {"toc.dat", "3001.dat.gz"}
    assert sums["toc.dat"] == hashlib.sha256(b"toc").hexdigest()
    assert sums["3001.dat.gz"] == hashlib.sha256(b"data").hexdigest()


def _hold_lock(directory: str, ready: multiprocessing.synchronize.Event, done: object) -> None:
    lock = DirectoryLock(Path(directory), purpose="backup run")
    lock.acquire()
    ready.set()
    done.wait(10)  # type: ignore[attr-defined]
    lock.release()


def test_directory_lock_excludes_another_process_and_names_the_holder(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    ready, done = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready, done))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(LockHeld, match=rf"pid {holder.pid} .*backup run"):
            DirectoryLock(tmp_path).acquire()
    finally:
        done.set()
        holder.join(10)
    again = DirectoryLock(tmp_path)
    again.acquire()  # free again once the holder let go
    again.release()


def test_backup_metrics_carry_the_contracted_names_from_manifests_alone(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from ops.backup.metrics import BackupCollector, BackupCounters

    store = BackupDirectory(tmp_path)
    _manifest(
        store,
        "20260101T030000Z-aaaaaa",
        finished_at="2026-01-01T03:00:10+00:00",
        size_bytes=1234,
        duration_seconds=10.0,
    )
    _manifest(
        store,
        "20260102T030000Z-bbbbbb",
        status=STATUS_FAILED,
        path=None,
        finished_at="2026-01-02T03:00:01+00:00",
    )
    _manifest(store, "20260103T030000Z-cccccc", database="other")
    settings = load_settings({"BACKUP_DIR": str(tmp_path), "POSTGRES_DB": "app"})
    registry = CollectorRegistry()
    BackupCounters(registry)
    nxt = datetime(2026, 1, 3, 3, 0, tzinfo=UTC)
    registry.register(BackupCollector(settings, lambda: 1, lambda: nxt))
    value = registry.get_sample_value
    assert (
        value("dbops_backup_last_success_timestamp_seconds")
        == datetime(2026, 1, 1, 3, 0, 10, tzinfo=UTC).timestamp()
    )
    assert value("dbops_backup_last_duration_seconds") == 10.0
    assert value("dbops_backup_last_size_bytes") == 1234
    assert value("dbops_backup_retained") == 1
    assert (
        value("dbops_backup_last_failure_timestamp_seconds")
        == datetime(2026, 1, 2, 3, 0, 1, tzinfo=UTC).timestamp()
    )
    assert value("dbops_backup_verify_last_success_timestamp_seconds") == 0
    assert value("dbops_backup_max_age_seconds") == 26 * 3600
    assert value("dbops_backup_in_progress") == 1
    assert value("dbops_backup_next_run_timestamp_seconds") == nxt.timestamp()
    for result in ("ok", "failed", "locked"):
        assert value("dbops_backup_runs_total", {"result": result}) == 0


def test_sizes_are_shown_in_the_unit_that_fits() -> None:
    from ops.units import human_size

    assert human_size(0) == "0 B"
    assert human_size(999) == "999 B"
    assert human_size(48_213) == "48.2 kB"
    assert human_size(2_000_000) == "2.00 MB"
    assert human_size(63_500_000) == "63.5 MB"
    assert human_size(1_070_000_000) == "1.07 GB"
    assert human_size(5e15) == "5000.0 TB"
