"""The pure parts of off-host shipping: WAL order and gaps, object names, backoff, which item
goes next, failure kinds, the queue on disk and the metrics built from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ops.offsite.cloud import _error_line, classify_output
from ops.offsite.dumps import DumpShipping
from ops.offsite.metrics import OffsiteCollector, OffsiteCounters
from ops.offsite.queue import QueuedBackup, QueuedWal, UploadQueue
from ops.offsite.settings import OffsiteSettings
from ops.offsite.shipper import Shipper, backoff, next_item, ready_backup
from ops.offsite.wal import gaps, missing_count, name_of_object, segment_name, sort_key
from ops.pitr.settings import PitrSettings


def test_history_files_ship_before_their_timelines_segments_and_segments_in_number_order() -> None:
    names = [
        "000000020000000100000000",
        "00000002.history",
        "0000000100000000000000FF",
        "000000010000000100000000",
        "000000010000000000000002",
    ]
    assert sorted(names, key=sort_key) == [
        "000000010000000000000002",
        "0000000100000000000000FF",
        "000000010000000100000000",
        "00000002.history",
        "000000020000000100000000",
    ]


def test_gaps_cross_the_log_boundary_per_timeline_and_from_the_oldest_needed_segment() -> None:
    present = [segment_name(1, n) for n in (250, 251, 252, 253, 254, 255, 256, 258, 259)] + [
        segment_name(2, n) for n in (300, 303)
    ]
    found = gaps(present)
    assert [(g.first_missing, g.count) for g in found] == [
        ("000000010000000100000001", 1),
        ("00000002000000010000002D", 2),
    ]
    assert missing_count(found) == 3
    assert "2 segments" in str(found[1])
    # Before the oldest base backup's first WAL, retention may have removed segments: no gap.
    old = [segment_name(1, 1), segment_name(1, 40), segment_name(1, 41)]
    assert gaps(old, since=segment_name(1, 40)) == []
    assert len(gaps(old)) == 1
    assert gaps([]) == []


def test_only_whole_wal_objects_in_their_hash_directory_count() -> None:
    base = "p/dbops/wals/0000000100000000/"
    assert name_of_object(base + "000000010000000000000003.gz") == "000000010000000000000003"
    assert name_of_object(base + "000000010000000000000003") == "000000010000000000000003"
    assert name_of_object("p/dbops/wals/00000002.history.gz") == "00000002.history"
    for stray in (
        base + "000000010000000000000003.partial",
        base + "000000010000000000000003.gz.tmp",
        base + "junk",
        "p/dbops/wals/0000000100000001/000000010000000000000003.gz",  # wrong directory
        "p/dbops/wals/000000010000000000000003.gz",
    ):
        assert name_of_object(stray) is None, stray


def test_backoff_doubles_from_five_seconds_and_stops_at_five_minutes() -> None:
    assert [backoff(n) for n in range(0, 9)] == [0, 5, 10, 20, 40, 80, 160, 300, 300]
    assert backoff(10_000) == 300


def wal(name: str) -> QueuedWal:
    return QueuedWal(name, Path("/q") / name, 16 * 1024**2, 0.0)


def test_a_base_backup_ships_only_after_the_wal_up_to_its_end() -> None:
    backup = QueuedBackup("20261128T000000", Path("/q/b"), segment_name(1, 5), 1.0, 100)
    queued = [wal(segment_name(1, n)) for n in (4, 5, 6)]
    assert next_item(queued, [backup]) == queued[0]
    assert ready_backup(queued[1:], [backup]) is None
    assert ready_backup(queued[2:], [backup]) == backup
    assert next_item([], [backup]) == backup
    assert next_item([], []) is None
    unknown_end = QueuedBackup("20261128T000001", Path("/q/c"), None, None, 1)
    assert ready_backup(queued, [unknown_end]) is None
    assert ready_backup([], [unknown_end]) == unknown_end


def test_barman_cloud_failures_are_classified_and_shortened_to_their_error() -> None:
    text = (
        "2026-11-28 22:27:14,190 [2652] ERROR: Barman cloud WAL archiver exception: "
        'Connection was closed before we received a valid response from endpoint URL: "x"'
    )
    assert classify_output(text) == "unreachable"
    assert _error_line(text).startswith("Connection was closed")
    assert classify_output("An error occurred (InvalidAccessKeyId) when calling") == "credentials"
    assert classify_output("An error occurred (NoSuchBucket) when calling") == "bucket"
    assert classify_output("An error occurred (ServiceUnavailable): down") == "server"
    assert classify_output("something else entirely") == "other"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        # A bucket name with "503" in it: the store was down, not answering 503.
        (
            "2026-11-29 18:06:58,377 [25401] ERROR: Barman cloud WAL archiver exception: "
            "Connection was closed before we received a valid response from endpoint URL: "
            '"http://127.0.0.1:39107/dbops-test-95cafc9503a4/site-a/dbops/wals/'
            '0000000100000000/00000001000000000000000C.gz".',
            "unreachable",
        ),
        ("s3://backups-403/site: Could not connect to the endpoint URL", "unreachable"),
        ("2026-11-29 18:06:58,500 [503] ERROR: Connection reset by peer", "unreachable"),
        (
            "An error occurred (503) when calling the PutObject operation (reached max "
            "retries: 2): Service Unavailable",
            "server",
        ),
        ("An error occurred (403) when calling the HeadBucket operation: Forbidden", "credentials"),
        ("An error occurred (502) when calling the PutObject operation: Bad Gateway", "server"),
    ],
)
def test_a_status_code_counts_only_where_boto3_prints_one(text: str, kind: str) -> None:
    assert classify_output(text) == kind


def archive(tmp_path: Path, names: list[str]) -> list[tuple[str, Path]]:
    wals = tmp_path / "archive"
    wals.mkdir(exist_ok=True)
    found = []
    for name in names:
        path = wals / name
        path.write_bytes(name.encode() * 10)
        found.append((name, path))
    return found


def test_queued_wal_survives_barman_removing_its_file_and_a_restart(tmp_path: Path) -> None:
    queue = UploadQueue(tmp_path / "offsite")
    queue.prepare()
    archived = archive(tmp_path, [segment_name(1, n) for n in (3, 1, 2)])
    assert queue.enqueue_wals(archived) == [segment_name(1, n) for n in (1, 2, 3)]
    for _, path in archived:
        path.unlink()  # Barman's retention removes its copies
    (queue.wal_dir / ".incoming-000000010000000000000009").write_bytes(b"half")  # a killed run
    again = UploadQueue(tmp_path / "offsite")
    again.prepare()
    assert [item.name for item in again.wals()] == [segment_name(1, n) for n in (1, 2, 3)]
    assert again.wals()[0].path.read_bytes() == segment_name(1, 1).encode() * 10
    assert not list(queue.wal_dir.glob(".incoming-*"))
    # Already queued files are not queued twice; newer ones are, and older ones never again.
    more = archive(tmp_path, [segment_name(1, n) for n in (2, 4)])
    assert again.enqueue_wals(more) == [segment_name(1, 4)]
    again.done_wal(again.wals()[0])
    assert again.enqueue_wals(archive(tmp_path, [segment_name(1, 1)])) == []
    assert [item.name for item in again.wals()] == [segment_name(1, n) for n in (2, 3, 4)]


def test_new_wal_on_an_earlier_timeline_is_queued_after_going_back(tmp_path: Path) -> None:
    queue = UploadQueue(tmp_path / "offsite")
    queue.prepare()
    first = [segment_name(2, 5), "00000003.history", segment_name(3, 6), segment_name(3, 7)]
    assert queue.enqueue_wals(archive(tmp_path, first)) == [first[0], *first[1:]]
    # Back on timeline 2 (the data from before a recovery): its new segments sort below
    # timeline 3's and are shipped all the same; what was queued before is not queued again.
    later = [segment_name(2, 5), segment_name(2, 6), segment_name(3, 7)]
    assert queue.enqueue_wals(archive(tmp_path, later)) == [segment_name(2, 6)]


def test_a_queued_base_backup_is_a_linked_tree_with_its_backup_info(tmp_path: Path) -> None:
    source = tmp_path / "base" / "20261128T010203"
    (source / "data" / "base").mkdir(parents=True)
    (source / "data" / "base" / "1").write_bytes(b"x" * 1000)
    info = tmp_path / "meta.info"
    info.write_text("status=DONE\n")
    queue = UploadQueue(tmp_path / "offsite")
    queue.prepare()
    assert queue.enqueue_backup("20261128T010203", source, info, segment_name(1, 4), 5.0)
    assert not queue.enqueue_backup("20261128T010203", source, info, segment_name(1, 4), 5.0)
    (item,) = queue.backups()
    queued_file = item.path / "data" / "base" / "1"
    assert os.stat(queued_file).st_ino == os.stat(source / "data" / "base" / "1").st_ino
    assert (item.path / "backup.info").read_text() == "status=DONE\n"
    assert item.end_wal == segment_name(1, 4) and item.end_time == 5.0
    queue.done_backup(item)
    assert queue.backups() == []
    # Shipped, then gone from the queue: a later scan does not queue it again.
    assert not queue.enqueue_backup("20261128T010203", source, info, None, None)
    with pytest.raises(ValueError):
        queue.enqueue_backup("../escape", source, info, None, None)


def test_metrics_carry_wal_basebackup_and_dump_in_shared_families_without_secrets(
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    counters = OffsiteCounters(registry)
    offsite = OffsiteSettings(
        url="s3://my-site-store/prefix",
        access_key_id="AKIDEXAMPLE",
        secret_access_key="very-secret-value",
        directory=tmp_path / "offsite",
    )
    shipper = Shipper(offsite, PitrSettings(directory=tmp_path / "pitr"), counters)
    shipper.queue.prepare()
    shipper.queue.enqueue_wals(archive(tmp_path, [segment_name(1, 7), segment_name(1, 8)]))
    counters.failures.labels("dump", "credentials").inc()
    registry.register(
        OffsiteCollector(shipper, dumps=lambda: DumpShipping(2, 2048, 1_700_000_000.0))
    )
    text = generate_latest(registry).decode()
    assert 'dbops_offsite_queue_files{what="wal"} 2.0' in text
    assert 'dbops_offsite_queue_files{what="dump"} 2.0' in text
    assert 'dbops_offsite_queue_bytes{what="dump"} 2048.0' in text
    assert 'dbops_offsite_upload_failures_total{kind="credentials",what="dump"} 1.0' in text
    assert "dbops_offsite_dump_last_shipped_timestamp_seconds 1.7e+09" in text
    assert "dbops_offsite_wal_lag_segments 2.0" in text
    assert "dbops_offsite_wal_lag_seconds" in text
    assert "dbops_offsite_store_up" not in text  # not checked yet: no value rather than 0
    assert (
        "very-secret-value" not in text
        and "AKIDEXAMPLE" not in text
        and "my-site-store" not in text
    )
