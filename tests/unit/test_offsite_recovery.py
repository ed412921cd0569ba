"""Recovery from the object store, its pure parts: the recovery settings, which WAL a staged
recovery needs, the store's backup list, and the restore_command wrapper's contract."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ops.offsite.cloudread import CloudReader, StoredWal, stored_backup
from ops.offsite.recovery import (
    env_file_text,
    needed_wal,
    recovery_settings,
    write_fetch_wrapper,
)
from ops.offsite.settings import OffsiteSettings
from ops.pitr.restore import Target, parse_target

HOSTILE_SECRET = "a'b\"c $(touch /tmp/pwned) `id` \\ d;e"


def offsite(secret: str = "s3cr3t") -> OffsiteSettings:
    return OffsiteSettings(
        url="s3://bucket/prefix",
        endpoint_url="http://127.0.0.1:9000",
        access_key_id="key-id",
        secret_access_key=secret,
    )


def settings_lines(text: str) -> dict[str, str]:
    """The last value of each setting, as PostgreSQL reads postgresql.auto.conf."""
    found = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            found[name.strip()] = value.strip()
    return found


def test_recovery_settings_reset_every_other_target_before_setting_the_time() -> None:
    target = parse_target("2026-11-28 14:05:00+00", None, False)
    values = settings_lines(recovery_settings("cp /w/%f %p", target))
    assert values["recovery_target_time"] == "'2026-11-28T14:05:00+00:00'"
    assert values["recovery_target_action"] == "'promote'"
    for other in ("recovery_target", "recovery_target_lsn", "recovery_target_xid"):
        assert values[other] == "''"
    text = recovery_settings("cp /w/%f %p", target)
    assert text.index("recovery_target_time = ''") < text.index("recovery_target_time = '2026")


def test_recovery_settings_for_latest_set_no_target_and_quote_the_command() -> None:
    values = settings_lines(recovery_settings("/x/it's here/restore-wal %f %p", Target("latest")))
    assert values["restore_command"] == "'/x/it''s here/restore-wal %f %p'"
    assert values["recovery_target_time"] == "''" and "recovery_target_action" not in values


def wal(name: str) -> StoredWal:
    return StoredWal(name, f"p/dbops/wals/{name[:16]}/{name}.gz", 0.0)


def test_staged_recovery_needs_the_backups_segments_onwards_and_every_history_file() -> None:
    backup = stored_backup(
        {"backup_id": "b", "status": "DONE", "begin_wal": "000000020000000000000005"}
    )
    names = [
        "000000010000000000000004",  # before the backup, older timeline
        "000000010000000000000006",  # an older timeline than the backup's
        "000000020000000000000004",  # before the backup's first segment
        "000000020000000000000005",
        "000000020000000000000006",
        "000000030000000000000007",
        "00000002.history",
        "00000003.history",
    ]
    kept = {w.name for w in needed_wal([wal(n) for n in names], backup)}
    assert kept == {
        "000000020000000000000005",
        "000000020000000000000006",
        "000000030000000000000007",
        "00000002.history",
        "00000003.history",
    }


def test_the_stores_backup_list_entries_read_as_backup_infos() -> None:
    backup = stored_backup(
        {
            "backup_id": "20261128T120000",
            "status": "DONE",
            "end_time_iso": "2026-11-28T12:00:05+00:00",
            "end_xlog": "0/5000100",
            "begin_wal": "000000010000000000000005",
            "timeline": 1,
            "size": 1234,
        }
    )
    assert backup.done and backup.end_lsn == "0/5000100" and backup.timeline == 1
    assert backup.end_time == datetime(2026, 11, 28, 12, 0, 5, tzinfo=UTC).timestamp()
    assert stored_backup({"backup_id": "x", "end_time_iso": "garbage"}).end_time is None


def test_a_hostile_secret_survives_the_env_file_as_data_never_as_shell(tmp_path: Path) -> None:
    env_file = tmp_path / "store.env"
    env_file.write_text(env_file_text(offsite(HOSTILE_SECRET)))
    result = subprocess.run(
        ["sh", "-c", f'set -a; . "{env_file}"; printf %s "$AWS_SECRET_ACCESS_KEY"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == HOSTILE_SECRET
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize(("program_exit", "wrapper_exit"), [(0, 0), (1, 1), (2, 126), (4, 126)])
def test_the_wrapper_ends_recovery_only_on_a_missing_file_and_stops_it_on_a_failure(
    tmp_path: Path, program_exit: int, wrapper_exit: int
) -> None:
    """barman-cloud-wal-restore exits 1 for a file the store lacks (the end of the archive);
    any other failure maps to 126, on which PostgreSQL stops instead of promoting early."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    seen = tmp_path / "seen"
    fake = bindir / "barman-cloud-wal-restore"
    fake.write_text(
        f'#!/bin/sh\nprintf "%s|%s" "$AWS_SECRET_ACCESS_KEY" "$*" > "{seen}"\nexit {program_exit}\n'
    )
    fake.chmod(0o755)
    data = tmp_path / "data"
    data.mkdir()
    directory = write_fetch_wrapper(CloudReader(offsite(HOSTILE_SECRET), bindir), data)
    result = subprocess.run(
        [str(directory / "restore-wal"), "000000010000000000000001", "pg_wal/RECOVERYXLOG"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == wrapper_exit
    secret, args = seen.read_text().split("|", 1)
    assert secret == HOSTILE_SECRET  # from the env file ...
    assert HOSTILE_SECRET not in args and "key-id" not in args  # ... never in the arguments
    assert args.endswith("s3://bucket/prefix dbops 000000010000000000000001 pg_wal/RECOVERYXLOG")
    assert "--endpoint-url http://127.0.0.1:9000 --addressing-style path" in args
