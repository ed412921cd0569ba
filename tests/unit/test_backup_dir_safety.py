"""The backup directory as a trust boundary, without a database: manifests checked against their
schema, names derived from ids, links never followed, locks, retention under clock skew.

Every hostile case plants sentinels outside the directory and proves they survive byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ops.backup.lock import (
    RUN_LOCK,
    DirectoryLock,
    LockHeld,
    claim_for_deletion,
    reading,
)
from ops.backup.manifest import (
    MANIFEST_MAX_BYTES,
    STATUS_OK,
    BackupDirectory,
    BackupDirError,
    Manifest,
    UnsafeEntry,
    Verification,
    checksum_dump,
)
from ops.backup.metrics import BackupCollector
from ops.backup.prune import prune
from ops.backup.retention import Candidate, GfsRetention, KeepLast
from ops.backup.verify import checksum_problems
from ops.settings import Settings, load_settings
from tests.sentinels import snapshot

GOOD = "20260101T030000Z-aaaaaa"
OTHER = "20260102T030000Z-bbbbbb"


# -- helpers -------------------------------------------------------------------------------------
def settings_for(directory: Path, **extra: str) -> Settings:
    return load_settings({"BACKUP_DIR": str(directory), "POSTGRES_DB": "app", **extra})


def keep_one(directory: Path) -> Settings:
    return settings_for(
        directory,
        BACKUP_KEEP_LAST="1",
        BACKUP_KEEP_DAILY="0",
        BACKUP_KEEP_WEEKLY="0",
        BACKUP_KEEP_MONTHLY="0",
    )


def started(backup_id: str) -> str:
    return datetime.strptime(backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).isoformat()


def good_manifest(backup_id: str, **fields: object) -> dict[str, object]:
    data: dict[str, object] = {
        "id": backup_id,
        "database": "app",
        "format": "custom",
        "compression": "1",
        "status": STATUS_OK,
        "started_at": started(backup_id),
        "finished_at": started(backup_id),
        "duration_seconds": 1.5,
        "size_bytes": 13,
        "path": f"{backup_id}.dump",
        "files": {},
        "tables": {"public.t": 3},
        "verifications": [],
        "tool": "dbops",
        "manifest_version": 1,
    }
    data.update(fields)
    return data


def plant(directory: Path, backup_id: str, data: object | str, dump: bool = True) -> Path:
    if dump:
        (directory / f"{backup_id}.dump").write_bytes(b"PGDMP" + backup_id.encode())
    path = directory / f"{backup_id}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def warnings_about(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and name in r.getMessage()
    ]


# -- schema --------------------------------------------------------------------------------------
DEEP = "[" * 100_000 + "]" * 100_000
HOSTILE = {
    "path-not-a-string": (dict(path=123), "path"),
    "path-dot-dot": (dict(path="../outside/secret.dump"), "path"),
    "path-absolute": (dict(path="/etc/passwd"), "path"),
    "path-another-backups-dump": (dict(path=f"{GOOD}.dump"), "path"),
    "size-a-string": (dict(size_bytes="13"), "size_bytes"),
    "size-a-boolean": (dict(size_bytes=True), "size_bytes"),
    "size-negative": (dict(size_bytes=-1), "size_bytes"),
    "id-differs-from-file-name": (dict(id=GOOD), "id"),
    "id-not-a-string": (dict(id=7), "id"),
    "verification-time-bad": (
        dict(verifications=[dict(kind="drill", ok=True, at="yesterday", duration_seconds=1)]),
        "verifications[1].at",
    ),
    "verification-not-an-object": (dict(verifications=["ok"]), "verifications[1]"),
    "verification-ok-a-string": (
        dict(verifications=[dict(kind="drill", ok="yes", at=started(GOOD), duration_seconds=1)]),
        "verifications[1].ok",
    ),
    "verifications-not-a-list": (dict(verifications={"a": 1}), "verifications"),
    "files-absolute": (dict(files={"/etc/passwd": "0" * 64}), "files"),
    "files-dot-dot": (dict(files={"../outside/secret.dump": "0" * 64}), "files"),
    "files-directory-dot-dot": (
        dict(format="directory", path=f"{OTHER}.dir", files={"../x": "0" * 64}),
        "files",
    ),
    "files-bad-digest": (dict(files={f"{GOOD}.dump": "zz"}), "files"),
    "files-not-an-object": (dict(files=["a"]), "files"),
    "tables-not-counts": (dict(tables={"public.t": "many"}), "tables"),
    "started-unparseable": (dict(started_at="the other day"), "started_at"),
    "started-missing": (dict(started_at=None), "started_at"),
    "finished-a-number": (dict(finished_at=5), "finished_at"),
    "duration-a-string": (dict(duration_seconds="fast"), "duration_seconds"),
    "format-unknown": (dict(format="tar"), "format"),
    "status-unknown": (dict(status="maybe"), "status"),
    "database-not-a-string": (dict(database=["app"]), "database"),
    "version-from-the-future": (dict(manifest_version=99), "manifest_version"),
    "not-ours": (dict(tool="someone-else"), "tool"),
    "error-not-a-string": (dict(error={"x": 1}), "error"),
}


@pytest.mark.parametrize(("fields", "field"), HOSTILE.values(), ids=HOSTILE.keys())
def test_an_invalid_manifest_is_skipped_with_one_warning_naming_file_and_field(
    backups: Path,
    outside: Path,
    caplog: pytest.LogCaptureFixture,
    fields: dict[str, object],
    field: str,
) -> None:
    plant(backups, GOOD, good_manifest(GOOD))
    bad = plant(backups, OTHER, good_manifest(OTHER, **fields))
    store = BackupDirectory(backups)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # listed again and again: still one warning
            assert [m.id for m in store.manifests()] == [GOOD]
            assert [m.id for m in store.backups("app")] == [GOOD]
    assert list(store.invalid) == [bad.name]
    warned = warnings_about(caplog, bad.name)
    assert len(warned) == 1, warned
    assert f"field {field}:" in warned[0]
    assert "\n" not in warned[0]
    assert store.get(OTHER) is None


BROKEN_FILES = {
    "truncated": ("{ truncated", "line 1: not valid JSON"),
    "not-an-object": ("[1, 2]", "not a JSON object"),
    "nan": (json.dumps(good_manifest(OTHER)).replace("1.5", "NaN"), "not valid JSON"),
    "huge-integer": (
        json.dumps(good_manifest(OTHER)).replace('"size_bytes": 13', '"size_bytes": ' + "9" * 5000),
        "not valid JSON",
    ),
    "deep-nesting": (DEEP, "not valid JSON"),
}


@pytest.mark.parametrize(("content", "reason"), BROKEN_FILES.values(), ids=BROKEN_FILES.keys())
def test_an_unparseable_manifest_is_skipped_with_one_warning(
    backups: Path, caplog: pytest.LogCaptureFixture, content: str, reason: str
) -> None:
    plant(backups, GOOD, good_manifest(GOOD))
    bad = plant(backups, OTHER, content)
    store = BackupDirectory(backups)
    with caplog.at_level(logging.WARNING):
        assert [m.id for m in store.manifests()] == [GOOD]
    warned = warnings_about(caplog, bad.name)
    assert len(warned) == 1 and reason in warned[0], warned


def test_a_manifest_that_is_not_utf8_or_too_big_is_skipped(backups: Path) -> None:
    plant(backups, GOOD, good_manifest(GOOD))
    (backups / f"{OTHER}.json").write_bytes(b'{"id": "\xff"}')
    huge = "20260103T030000Z-cccccc"
    with open(backups / f"{huge}.json", "wb") as handle:  # sparse: cheap to make
        handle.truncate(MANIFEST_MAX_BYTES + 1)
    store = BackupDirectory(backups)
    assert [m.id for m in store.manifests()] == [GOOD]
    assert "not UTF-8" in store.invalid[f"{OTHER}.json"]
    assert "larger than" in store.invalid[f"{huge}.json"]


def test_a_symlinked_manifest_is_not_followed(
    backups: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / f"{OTHER}.json").write_text(json.dumps(good_manifest(OTHER)))
    (elsewhere / f"{OTHER}.dump").write_bytes(b"PGDMP")
    before = snapshot(elsewhere)
    os.symlink(elsewhere / f"{OTHER}.json", backups / f"{OTHER}.json")
    os.symlink(elsewhere / f"{OTHER}.dump", backups / f"{OTHER}.dump")
    plant(backups, GOOD, good_manifest(GOOD))
    store = BackupDirectory(backups)
    with caplog.at_level(logging.WARNING):
        assert [m.id for m in store.backups("app")] == [GOOD]
    assert "symbolic link" in store.invalid[f"{OTHER}.json"]
    assert store.get(OTHER) is None
    assert prune(keep_one(backups)).deleted == []
    assert snapshot(elsewhere) == before


def test_a_fifo_named_like_a_manifest_never_hangs_a_listing(backups: Path) -> None:
    plant(backups, GOOD, good_manifest(GOOD))
    os.mkfifo(backups / f"{OTHER}.json")
    store = BackupDirectory(backups)
    assert [m.id for m in store.manifests()] == [GOOD]
    assert "not a regular file" in store.invalid[f"{OTHER}.json"]


def test_a_symlinked_dump_is_no_backup_and_checks_never_read_through_it(
    backups: Path, outside: Path
) -> None:
    plant(backups, GOOD, good_manifest(GOOD), dump=False)
    os.symlink(outside / "secret.dump", backups / f"{GOOD}.dump")
    store = BackupDirectory(backups)
    assert store.backups("app") == []
    assert "symbolic link" in store.invalid[f"{GOOD}.dump"]
    manifest = store.get(GOOD)
    assert manifest is not None
    assert checksum_problems(store, manifest) == [f"{GOOD}.dump is a symbolic link; not followed"]


def test_a_link_inside_a_directory_dump_is_reported_not_read(backups: Path, outside: Path) -> None:
    dump = backups / f"{GOOD}.dir"
    dump.mkdir()
    (dump / "toc.dat").write_bytes(b"toc")
    os.symlink(outside / "secret.dump", dump / "3001.dat.gz")
    with pytest.raises(UnsafeEntry, match="symbolic link"):
        checksum_dump(dump)
    plant(
        backups,
        GOOD,
        good_manifest(GOOD, format="directory", path=f"{GOOD}.dir"),
        dump=False,
    )
    store = BackupDirectory(backups)
    manifest = store.get(GOOD)
    assert manifest is not None
    assert checksum_problems(store, manifest) == ["3001.dat.gz is a symbolic link; not followed"]


def test_data_path_comes_from_the_id_never_from_the_manifest(backups: Path) -> None:
    store = BackupDirectory(backups)
    manifest = Manifest(
        id=GOOD,
        database="app",
        format="custom",
        compression="1",
        status=STATUS_OK,
        started_at=started(GOOD),
        path="../../etc/passwd",
    )
    assert store.data_path(manifest) == backups / f"{GOOD}.dump"
    manifest.id = "../escape"
    with pytest.raises(ValueError, match="not a backup id"):
        store.data_path(manifest)
    with pytest.raises(ValueError, match="not a plain name"):
        store.temp_path("../x")


# -- writing and deleting ------------------------------------------------------------------------
def test_writing_a_manifest_replaces_a_planted_link_never_its_target(
    backups: Path, outside: Path
) -> None:
    os.symlink(outside / "passwd", backups / f"{GOOD}.json")
    store = BackupDirectory(backups)
    manifest = Manifest.from_dict(good_manifest(GOOD))
    store.write(manifest)
    assert not (backups / f"{GOOD}.json").is_symlink()
    assert [p.name for p in backups.iterdir()] == [f"{GOOD}.json"]


def test_delete_removes_a_linked_dump_as_a_link_and_a_directory_dump_without_following(
    backups: Path, outside: Path
) -> None:
    store = BackupDirectory(backups)
    plant(backups, GOOD, good_manifest(GOOD), dump=False)
    os.symlink(outside / "secret.dump", backups / f"{GOOD}.dump")
    dump = backups / f"{OTHER}.dir"
    dump.mkdir()
    os.symlink(outside / "tree", dump / "inner")
    os.symlink(outside / "secret.dump", dump / "toc.dat")
    plant(backups, OTHER, good_manifest(OTHER, format="directory", path=f"{OTHER}.dir"), False)
    for backup_id in (GOOD, OTHER):
        manifest = store.get(backup_id)
        assert manifest is not None
        store.delete(manifest)
    assert list(backups.iterdir()) == []


def test_remove_temporaries_removes_links_as_links(backups: Path, outside: Path) -> None:
    os.symlink(outside / "tree", backups / ".dbops-tmp-20260101T030000Z-aaaaaa.dir")
    os.symlink(outside / "secret.dump", backups / ".dbops-tmp-20260101T030000Z-aaaaaa.dump")
    partial = backups / ".dbops-tmp-20260101T030000Z-bbbbbb.dir"
    partial.mkdir()
    os.symlink(outside / "tree", partial / "escape")
    assert len(BackupDirectory(backups).remove_temporaries()) == 3
    assert list(backups.iterdir()) == []


def test_prune_never_follows_a_manifest_path_outside_the_directory(
    backups: Path, outside: Path
) -> None:
    ids = [f"2026010{day}T030000Z-aaaaa{day}" for day in range(1, 6)]
    plant(backups, ids[0], good_manifest(ids[0], path="../outside/secret.dump"))
    plant(backups, ids[1], good_manifest(ids[1], path=str(outside / "tree")))
    plant(
        backups,
        ids[2],
        good_manifest(ids[2], format="directory", path=f"{ids[2]}.dir", files={"..": "0" * 64}),
        dump=False,
    )
    for backup_id in ids[3:]:
        plant(backups, backup_id, good_manifest(backup_id))
    settings = keep_one(backups)
    result = prune(settings)
    assert result.deleted == [ids[3]]
    assert sorted(result.invalid) == [f"{i}.json" for i in ids[:3]]
    # the invalid manifests and their data stay for the operator to look at
    for backup_id in ids[:2]:
        assert (backups / f"{backup_id}.json").exists()
        assert (backups / f"{backup_id}.dump").exists()


# -- locks ---------------------------------------------------------------------------------------
def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(
    backups: Path, outside: Path
) -> None:
    os.symlink(outside / "passwd", backups / RUN_LOCK)
    with pytest.raises(UnsafeEntry, match="symbolic link"):
        DirectoryLock(backups).acquire()
    os.symlink(outside / "nowhere", backups / ".dbops-manifest.lock")  # dangling: not created
    with pytest.raises(UnsafeEntry):
        DirectoryLock(backups, ".dbops-manifest.lock").acquire()
    assert not (outside / "nowhere").exists()


def test_a_hard_linked_lock_file_locks_but_is_never_written(backups: Path, outside: Path) -> None:
    os.link(outside / "passwd", backups / RUN_LOCK)
    lock = DirectoryLock(backups, purpose="backup run")
    lock.acquire()
    with pytest.raises(LockHeld, match="locked by another process"):
        DirectoryLock(backups).acquire()  # and the file's content is not shown
    lock.release()


def test_a_special_lock_file_is_refused(backups: Path) -> None:
    os.mkfifo(backups / ".dbops-drill.lock")
    with pytest.raises(UnsafeEntry, match="not a regular file"):
        DirectoryLock(backups, ".dbops-drill.lock").acquire()


def test_prune_cannot_claim_a_backup_while_it_is_read(backups: Path) -> None:
    store = BackupDirectory(backups)
    with reading(store, GOOD) as locked, reading(store, GOOD):
        assert locked
        with (
            pytest.raises(LockHeld, match=f"backup {GOOD} is being read"),
            claim_for_deletion(store, GOOD),
        ):
            pass
    with (
        claim_for_deletion(store, GOOD),
        pytest.raises(LockHeld, match="being deleted by retention"),
        reading(store, GOOD, wait=0.2),
    ):
        pass
    assert not (backups / f".dbops-read-{GOOD}.lock").exists()  # removed with the backup


def test_reading_refuses_names_that_are_not_backup_ids(backups: Path, outside: Path) -> None:
    store = BackupDirectory(backups)
    for hostile in ("../outside/passwd", "/etc/passwd", f"{GOOD}/../x", ""):
        with pytest.raises(ValueError), reading(store, hostile):
            pass
    assert list(backups.iterdir()) == []


def test_reading_on_a_missing_directory_is_one_clear_error(tmp_path: Path) -> None:
    store = BackupDirectory(tmp_path / "misspelled")
    with pytest.raises(BackupDirError, match=r"misspelled: does not exist$"), reading(store, GOOD):
        pass
    with pytest.raises(BackupDirError, match="does not exist"):
        store.manifests()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(BackupDirError, match="is not a directory"):
        BackupDirectory(tmp_path / "a-file").backups("app")


def test_prune_keeps_a_backup_that_is_being_read_and_says_so(backups: Path) -> None:
    ids = [f"2026010{day}T030000Z-aaaaa{day}" for day in range(1, 4)]
    for backup_id in ids:
        plant(backups, backup_id, good_manifest(backup_id))
    settings = keep_one(backups)
    with reading(BackupDirectory(backups), ids[0]):
        result = prune(settings)
    assert result.deleted == [ids[1]]
    assert "being read" in result.skipped[ids[0]]
    assert (backups / f"{ids[0]}.dump").exists()
    assert prune(settings).deleted == [ids[0]]


def test_the_run_lock_stays_held_while_a_child_that_inherited_it_lives(backups: Path) -> None:
    lock = DirectoryLock(backups, purpose="backup run")
    lock.acquire()
    child = subprocess.Popen(["sleep", "30"], pass_fds=(lock.fileno(),))
    try:
        lock.release()  # the parent is gone, as after a kill -9
        with pytest.raises(LockHeld):
            DirectoryLock(backups).acquire()
    finally:
        child.kill()
        child.wait()
    again = DirectoryLock(backups)
    again.acquire()
    again.release()


def test_a_child_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        from ops.backup.children import die_with_parent
        child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent())
        print(child.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child_pid):
        time.sleep(0.05)
    assert not _alive(child_pid), "the child outlived its killed parent"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- retention and clock skew --------------------------------------------------------------------
def test_future_dated_backups_take_no_slot_are_kept_and_reported() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    future = Candidate("future", now + timedelta(days=365))
    current = Candidate("current", now)
    older = Candidate("older", now - timedelta(days=1))
    plan = GfsRetention((KeepLast(1),)).plan([future, current, older], now=now)
    assert [c.id for c in plan.future] == ["future"]
    assert [c.id for c in plan.delete] == ["older"]
    assert "one of the last 1" in plan.keep["current"]
    assert "untrusted" in plan.keep["future"][0]
    # a few seconds of skew between hosts is not "the future"
    skewed = Candidate("skewed", now + timedelta(seconds=30))
    assert GfsRetention((KeepLast(1),)).plan([skewed, current], now=now).future == []


def test_the_backup_a_run_took_is_never_pruned_by_that_run() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    # the host clock is behind: the run's backup looks older than what is on disk
    just_taken = Candidate("just-taken", now - timedelta(days=30))
    newer = [Candidate(f"n{i}", now - timedelta(days=i)) for i in range(3)]
    plan = GfsRetention((KeepLast(1),)).plan(
        [just_taken, *newer], now=now, protected={"just-taken"}
    )
    assert "just-taken" not in [c.id for c in plan.delete]
    assert plan.keep["just-taken"] == ["taken by this run"]


def test_newest_verified_is_kept_even_when_newer_ones_are_future_dated() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    verified = Candidate("verified", now - timedelta(days=5), verified=True)
    plan = GfsRetention((KeepLast(1),)).plan(
        [
            Candidate("future", now + timedelta(days=9), verified=True),
            Candidate("latest", now),
            verified,
        ],
        now=now,
    )
    assert plan.delete == []
    assert "newest verified backup" in plan.keep["verified"]


def test_prune_with_future_dated_manifests_keeps_the_newest_real_backup(backups: Path) -> None:
    future = "20990101T000000Z-ffffff"
    plant(backups, future, good_manifest(future))
    today = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-cccccc"
    plant(backups, today, good_manifest(today))
    settings = keep_one(backups)
    result = prune(settings)
    assert result.deleted == []
    assert [c.id for c in result.plan.future] == [future]


# -- metrics -------------------------------------------------------------------------------------
def _scrape(settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(BackupCollector(settings, lambda: 0, lambda: None))
    return registry


def test_metrics_count_invalid_and_future_dated_manifests_and_still_report_the_rest(
    backups: Path,
) -> None:
    plant(backups, GOOD, good_manifest(GOOD, finished_at="2026-01-01T03:00:10+00:00"))
    plant(backups, OTHER, good_manifest(OTHER, size_bytes="lots"))
    future = "20990101T000000Z-ffffff"
    drill = Verification("drill", True, "2099-01-01T01:00:00+00:00", 1.0)
    plant(backups, future, good_manifest(future, verifications=[drill.__dict__]))
    registry = _scrape(settings_for(backups))
    value = registry.get_sample_value
    assert value("dbops_backup_manifests_invalid") == 1.0
    assert value("dbops_backup_manifests_future_dated") == 1.0
    assert value("dbops_backup_directory_readable") == 1.0
    assert value("dbops_backup_last_success_timestamp_seconds") == (
        datetime(2026, 1, 1, 3, 0, 10, tzinfo=UTC).timestamp()
    )
    assert value("dbops_backup_verify_last_success_timestamp_seconds") == 0.0
    assert value("dbops_backup_retained") == 2.0


def test_metrics_answer_when_the_directory_is_missing(tmp_path: Path) -> None:
    registry = _scrape(settings_for(tmp_path / "misspelled"))
    assert registry.get_sample_value("dbops_backup_directory_readable") == 0.0
    assert registry.get_sample_value("dbops_backup_retained") == 0.0


def test_prune_keeps_a_backup_whose_read_lock_is_a_planted_link(
    backups: Path, outside: Path
) -> None:
    ids = [f"2026010{day}T030000Z-aaaaa{day}" for day in range(1, 3)]
    for backup_id in ids:
        plant(backups, backup_id, good_manifest(backup_id))
    os.symlink(outside / "passwd", backups / f".dbops-read-{ids[0]}.lock")
    result = prune(keep_one(backups))
    assert result.deleted == []
    assert "symbolic link" in result.skipped[ids[0]]
    assert (backups / f"{ids[0]}.dump").exists()


def test_manifest_text_is_printed_on_one_line_with_control_characters_escaped() -> None:
    from ops.commands.backup import printable

    assert printable("pg_dump failed\nbackup 2026 ok\x1b[2K") == (
        "pg_dump failed\\nbackup 2026 ok\\x1b[2K"
    )
    assert printable("ünïcødé table") == "ünïcødé table"
