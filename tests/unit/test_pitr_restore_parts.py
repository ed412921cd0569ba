"""The parts of a PITR restore that decide before anything is written."""

from __future__ import annotations

import fcntl
import os
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from db.pgurl import parse_url
from ops.pitr.barman import BackupInfo, Barman, receive_wal_lock
from ops.pitr.restore import (
    RestoreRefused,
    choose_backup,
    format_lsn,
    parse_lsn,
    parse_target,
    prepare_destination,
    segment_end_lsn,
)
from ops.pitr.settings import RECEIVE_WAL_LOCK, PitrSettings
from ops.pitr.state import DrillRecord, last_drill, last_good_drill, record_drill
from ops.pitr.status import PitrStatus

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC).timestamp()


def backup(backup_id: str, end: float, end_lsn: str, status: str = "DONE") -> BackupInfo:
    return BackupInfo(
        id=backup_id,
        status=status,
        begin_time=end - 10,
        end_time=end,
        size_bytes=1,
        wal_size_bytes=0,
        end_lsn=end_lsn,
    )


def status_with(*backups: BackupInfo, archived_at: float, wal: str) -> PitrStatus:
    return PitrStatus(
        gathered_at=archived_at,
        backups=list(backups),
        last_wal_archived=wal,
        last_wal_archived_at=archived_at,
    )


STATUS = status_with(
    backup("20261128T115950", T0, "0/5000000"),
    backup("20261128T125950", T0 + 3600, "0/9000000"),
    backup("20261128T130000", T0 + 3700, "0/A000000", status="FAILED"),
    archived_at=T0 + 7200,
    wal="00000001000000000000000F",
)


def at(seconds: float) -> str:
    return datetime.fromtimestamp(T0 + seconds, UTC).isoformat()


def test_target_time_picks_the_newest_backup_that_ended_before_it() -> None:
    assert choose_backup(STATUS, parse_target(at(1800), None, False)).id == "20261128T115950"
    assert choose_backup(STATUS, parse_target(at(3601), None, False)).id == "20261128T125950"


def test_latest_picks_the_newest_good_backup_never_a_failed_one() -> None:
    assert choose_backup(STATUS, parse_target(None, None, True)).id == "20261128T125950"


@pytest.mark.parametrize(("seconds", "word"), [(-1, "before"), (7201, "past")])
def test_a_time_outside_the_window_is_refused_with_the_window(seconds: float, word: str) -> None:
    with pytest.raises(RestoreRefused, match=rf"is {word} the recovery window \(2026-11-28"):
        choose_backup(STATUS, parse_target(at(seconds), None, False))


def test_an_lsn_past_the_archived_wal_is_refused() -> None:
    assert segment_end_lsn("00000001000000000000000F") == 0x10000000
    assert choose_backup(STATUS, parse_target(None, "0/FFFFFFF", False)).id == "20261128T125950"
    with pytest.raises(RestoreRefused, match="past the archive"):
        choose_backup(STATUS, parse_target(None, "0/10000001", False))
    with pytest.raises(RestoreRefused, match="before the end of the oldest base backup"):
        choose_backup(STATUS, parse_target(None, "0/4000000", False))


def test_lsn_text_round_trips() -> None:
    assert format_lsn(parse_lsn("1A/3000060")) == "1A/3000060"


@pytest.mark.parametrize(
    ("time_text", "lsn", "latest", "message"),
    [
        ("2026-11-28 14:05:00", None, False, "give a time zone"),
        ("28/11/2026", None, False, "not a time"),
        (None, "3000060", False, "not an LSN"),
        ("2026-11-28 14:05:00+00", None, True, "exactly one"),
        (None, None, False, "exactly one"),
    ],
)
def test_malformed_targets_say_what_is_wrong(
    time_text: str | None, lsn: str | None, latest: bool, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_target(time_text, lsn, latest)


def test_a_target_time_in_another_zone_means_the_same_instant() -> None:
    target = parse_target("2026-11-28 15:05:00+01:00", None, False)
    assert target.time == datetime(2026, 11, 28, 14, 5, tzinfo=UTC)


def test_no_base_backup_means_nothing_to_restore() -> None:
    with pytest.raises(RestoreRefused, match="no base backup"):
        choose_backup(PitrStatus(gathered_at=0.0), parse_target(None, None, True))


def test_destination_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(RestoreRefused, match="is a symlink"):
        prepare_destination(tmp_path / "link", replace=True)


def test_a_directory_with_a_live_server_is_refused_even_with_replace(tmp_path: Path) -> None:
    import os

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "postmaster.pid").write_text(f"{os.getpid()}\n/data\n")
    with pytest.raises(RestoreRefused, match="server is running"):
        prepare_destination(tmp_path / "data", replace=True)
    assert (tmp_path / "data" / "postmaster.pid").exists()


def test_an_empty_or_missing_destination_needs_no_option(tmp_path: Path) -> None:
    assert prepare_destination(tmp_path / "missing", replace=False) is None
    (tmp_path / "empty").mkdir()
    assert prepare_destination(tmp_path / "empty", replace=False) is None


def test_drill_state_keeps_the_last_success_across_a_failure(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    good = DrillRecord(at=100.0, ok=True, seconds=12.5, backup_id="b1", target_time="t")
    record_drill(state, good)
    failed = DrillRecord(at=200.0, ok=False, seconds=3.0, error="restore failed")
    record_drill(state, failed)
    assert last_drill(state) == failed and last_good_drill(state) == good


def test_a_damaged_state_file_reads_as_no_drill(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text('{"last_drill": {"at": "soon"}}')
    assert last_drill(state) is None
    state.write_bytes(b"\xff\xfe not json")
    assert last_drill(state) is None


def test_barman_error_line_is_the_error_not_a_warning_before_it() -> None:
    from ops.pitr.barman import _error_of

    stderr = (
        "WARNING: pg_basebackup does not copy the PostgreSQL configuration files that reside "
        "outside PGDATA. Please manually backup the following files:\n"
        "\t/etc/dbops/pg_hba.conf\n\n"
        "EXCEPTION: [Errno 2] No such file or directory: 'file'\n"
        "See log file for more details.\n"
    )
    assert _error_of("", stderr) == "[Errno 2] No such file or directory: 'file'"
    assert _error_of('{"_ERROR": ["ERROR: Impossible to start the backup"]}', "") == (
        "Impossible to start the backup"
    )


def _barman_home(path: Path) -> Any:
    return cast(Any, SimpleNamespace(barman_home=path))


def test_the_partial_segment_is_taken_only_while_no_receiver_holds_its_lock(
    tmp_path: Path,
) -> None:
    lock = tmp_path / RECEIVE_WAL_LOCK
    with receive_wal_lock(_barman_home(tmp_path)) as free:
        assert free
    receiver = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(receiver, fcntl.LOCK_EX)
        with receive_wal_lock(_barman_home(tmp_path)) as free:
            assert not free
    finally:
        os.close(receiver)


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_a_planted_receiver_lock_is_neither_followed_nor_trusted(
    tmp_path: Path, planted: str
) -> None:
    lock = tmp_path / RECEIVE_WAL_LOCK
    victim = tmp_path / "victim"
    victim.write_text("kept")
    if planted == "symlink":
        lock.symlink_to(victim)
    else:
        os.mkfifo(lock)
    with receive_wal_lock(_barman_home(tmp_path)) as free:
        assert not free
    assert victim.read_text() == "kept"


def test_streaming_counts_as_running_only_while_a_receiver_holds_its_lock(
    tmp_path: Path,
) -> None:
    """`ops pitr backup` skips `barman cron` only then; a planted lock file makes it run cron,
    which reports the problem, rather than be taken for a running receiver."""
    barman = Barman(PitrSettings(directory=tmp_path), parse_url("postgresql://u@h/d"))
    home = barman.settings.barman_home
    home.mkdir()
    assert not barman.receiving()
    receiver = os.open(home / RECEIVE_WAL_LOCK, os.O_RDWR)
    try:
        fcntl.flock(receiver, fcntl.LOCK_EX)
        assert barman.receiving()
    finally:
        os.close(receiver)
    assert not barman.receiving()
    (home / RECEIVE_WAL_LOCK).unlink()
    os.mkfifo(home / RECEIVE_WAL_LOCK)
    assert not barman.receiving()


def test_the_stopped_servers_reason_is_not_our_own_refused_connection(tmp_path: Path) -> None:
    """wait_promoted polls while a server that cannot reach its target shuts down: the
    FATAL that turned that connection away comes after PostgreSQL's reason, and is not it."""
    from ops.pitr.scratch import ScratchServer

    server = ScratchServer.__new__(ScratchServer)
    server.logfile = tmp_path / "server.log"
    server.logfile.write_text(
        "LOG:  starting PostgreSQL 15\n"
        "FATAL:  recovery ended before configured recovery target was reached\n"
        "LOG:  startup process (PID 7) exited with exit code 1\n"
        "FATAL:  the database system is not accepting connections\n"
        "FATAL:  the database system is shutting down\n"
        "LOG:  database system is shut down\n"
    )
    assert server.last_log_line() == (
        "FATAL:  recovery ended before configured recovery target was reached"
    )
