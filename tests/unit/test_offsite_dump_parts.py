"""The pure parts of off-host dump copies: the queue file, backoff, keys, retention."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ops.backup.manifest import Manifest, Verification
from ops.offsite.dumpqueue import (
    BACKOFF_MAX,
    QUEUE_FILE,
    DumpQueue,
    QueueInvalid,
    QueueState,
    backoff,
    parse_state,
    queued_ids,
)
from ops.offsite.dumpretention import plan_offsite
from ops.offsite.dumps import data_keys, database_folder, manifest_key
from ops.offsite.settings import OffsiteSettings
from ops.settings import load_settings

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
OFFSITE = OffsiteSettings(url="s3://bucket/team/dbops")


def backup_id(moment: datetime, tail: str = "abcdef") -> str:
    return f"{moment:%Y%m%dT%H%M%SZ}-{tail}"


def manifest(moment: datetime, dump_format: str = "custom", database: str = "app") -> Manifest:
    ident = backup_id(moment)
    name = f"{ident}.dump" if dump_format == "custom" else f"{ident}.dir"
    files = {name: "0" * 64} if dump_format == "custom" else {"toc.dat": "1" * 64}
    return Manifest(
        id=ident,
        database=database,
        format=dump_format,
        compression="gzip",
        status="ok",
        started_at=moment.isoformat(),
        path=name,
        files=files,
        verifications=[Verification("checksum", True, moment.isoformat(), 1.0)],
    )


def test_backoff_doubles_from_thirty_seconds_and_stops_at_an_hour() -> None:
    assert [backoff(n) for n in range(5)] == [0.0, 30.0, 60.0, 120.0, 240.0]
    assert backoff(10) == backoff(10_000) == BACKOFF_MAX


def test_queue_keeps_backups_in_the_order_they_were_taken_and_never_twice() -> None:
    state = QueueState()
    later, earlier = backup_id(NOW), backup_id(NOW - timedelta(days=1))
    assert state.add(later, "app", 10, 1.0) and state.add(earlier, "app", 5, 2.0)
    assert not state.add(later, "app", 10, 3.0)
    state.shipped[backup_id(NOW - timedelta(days=2))] = 1.0
    assert not state.add(backup_id(NOW - timedelta(days=2)), "app", 1, 4.0)
    assert [p.id for p in parse_state(state.to_json().encode()).pending] == [earlier, later]


def test_two_backups_of_one_second_are_queued_in_the_order_they_started() -> None:
    """Their ids differ only in the random tail, which would put the later one first here."""
    first, second = backup_id(NOW, "ffffff"), backup_id(NOW, "000000")
    state = QueueState()
    start = NOW.timestamp()
    assert state.add(second, "app", 1, 1.0, start + 0.6) and state.add(
        first, "app", 1, 2.0, start + 0.2
    )
    assert [p.id for p in state.pending] == [first, second]
    assert [p.id for p in parse_state(state.to_json().encode()).pending] == [first, second]
    # a queue written before the start times were kept still reads, in id order
    old = {
        "version": 1,
        "pending": [
            {"id": second, "database": "app", "bytes": 1, "queued_at": 1},
            {"id": first, "database": "app", "bytes": 1, "queued_at": 1},
        ],
        "shipped": {},
        "failures": 0,
    }
    assert [p.id for p in parse_state(json.dumps(old).encode()).pending] == [second, first]


@pytest.mark.parametrize(
    "pending",
    [
        [{"id": "../../etc/passwd", "database": "app", "bytes": 1, "queued_at": 1}],
        [{"id": backup_id(NOW), "database": "app", "bytes": -1, "queued_at": 1}],
        [{"id": backup_id(NOW), "database": "", "bytes": 1, "queued_at": 1}],
        [{"id": backup_id(NOW), "database": "app", "bytes": 1, "queued_at": 1e300}],
        [{"id": backup_id(NOW), "database": "app", "bytes": True, "queued_at": 1}],
        [{"id": backup_id(NOW), "database": "app", "bytes": 1, "queued_at": 1, "started": "x"}],
        "not a list",
    ],
)
def test_a_queue_file_that_is_not_ours_is_refused(pending: object) -> None:
    content = {"version": 1, "pending": pending, "shipped": {}, "failures": 0}
    with pytest.raises(QueueInvalid):
        parse_state(json.dumps(content).encode())


def test_an_unreadable_queue_is_set_aside_never_deleted(tmp_path: Path) -> None:
    (tmp_path / QUEUE_FILE).write_text("{not json")
    with DumpQueue(tmp_path).update() as state:
        state.add(backup_id(NOW), "app", 1, 1.0)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{QUEUE_FILE}.invalid-")]
    assert len(aside) == 1 and aside[0].read_text() == "{not json"
    assert queued_ids(tmp_path) == {backup_id(NOW)}


def test_a_queue_file_planted_as_a_link_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    queue = tmp_path / "queue"
    queue.mkdir()
    os.symlink(victim, queue / QUEUE_FILE)
    assert DumpQueue(queue).read().pending == []
    with DumpQueue(queue).update() as state:
        state.add(backup_id(NOW), "app", 1, 1.0)
    assert victim.read_text() == "precious"
    assert not (queue / QUEUE_FILE).is_symlink()


@pytest.mark.parametrize(
    ("database", "folder"),
    [
        ("app", "team/dbops/dumps/app"),
        ("a/b", "team/dbops/dumps/a%2Fb"),
        ("..", "team/dbops/dumps/%2E%2E"),
        ("ünï code", "team/dbops/dumps/%C3%BCn%C3%AF%20code"),
    ],
)
def test_a_database_name_never_adds_or_climbs_a_level_of_keys(database: str, folder: str) -> None:
    assert database_folder(OFFSITE, database) == folder


def test_keys_of_a_backup_come_from_its_id_and_format() -> None:
    custom = manifest(NOW)
    assert manifest_key(OFFSITE, "app", custom.id) == f"team/dbops/dumps/app/{custom.id}.json"
    assert data_keys(OFFSITE, custom) == [
        (f"{custom.id}.dump", f"team/dbops/dumps/app/{custom.id}.dump")
    ]
    directory = manifest(NOW, "directory")
    assert data_keys(OFFSITE, directory) == [
        ("toc.dat", f"team/dbops/dumps/app/{directory.id}.dir/toc.dat")
    ]


def _settings(**env: str):  # type: ignore[no-untyped-def]
    base = {
        "DATABASE_URL": "postgresql://u:p@localhost/app",
        "OFFSITE_S3_URL": "s3://bucket/dbops",
        "BACKUP_KEEP_LAST": "1",
        "BACKUP_KEEP_DAILY": "0",
        "BACKUP_KEEP_WEEKLY": "0",
        "BACKUP_KEEP_MONTHLY": "0",
    }
    return load_settings({**base, **env})


def test_offsite_retention_defaults_to_the_local_counts_and_keeps_the_newest() -> None:
    backups = [manifest(NOW - timedelta(days=d)) for d in (9, 5, 1)]
    plan = plan_offsite(_settings(), backups, NOW)
    assert [c.id for c in plan.delete] == [backups[0].id, backups[1].id]
    assert backups[2].id in plan.keep


def test_offsite_retention_keeps_the_window_and_never_fewer_than_the_local_counts() -> None:
    backups = [manifest(NOW - timedelta(days=d)) for d in (30, 9, 5, 1)]
    plan = plan_offsite(_settings(OFFSITE_RETENTION="7d"), backups, NOW)
    assert [c.id for c in plan.delete] == [backups[0].id, backups[1].id]
    assert "within OFFSITE_RETENTION (7d)" in plan.keep[backups[2].id]
    shorter = plan_offsite(_settings(OFFSITE_RETENTION="1d", BACKUP_KEEP_LAST="3"), backups, NOW)
    assert [c.id for c in shorter.delete] == [backups[0].id]  # the local minimum wins


def test_make_users_are_told_the_make_spelling_of_the_offsite_listing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ops.hints import spell

    monkeypatch.setenv("OPS_HINTS", "make")
    assert spell("ops backup list --offsite") == "make backups FROM=offsite"
    monkeypatch.delenv("OPS_HINTS")
    assert spell("ops backup list --offsite") == "ops backup list --offsite"
