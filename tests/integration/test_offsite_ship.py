"""Off-host shipping on real servers: Barman's WAL and base backups reach a real S3 server
(moto) in Barman Cloud's layout, outages keep them queued and in order, and a wrong key, a
missing bucket or a stray object are said plainly without stopping streaming."""

from __future__ import annotations

import gzip
import logging
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ops.offsite.metrics import OffsiteCollector
from ops.offsite.report import offsite_checks
from ops.offsite.shipper import Shipper
from ops.pitr.service import PitrService
from ops.settings import Settings, load_settings
from tests.integration.pitr_helpers import execute, pitr_env
from tests.objectstore import ObjectStore
from tests.pgcluster import Cluster

PREFIX = "site-a"


def settings_for(env: dict[str, str]) -> Settings:
    keys = ("DATABASE_URL", "PITR_", "PG_BINDIR", "BACKUP_DIR", "OFFSITE_", "AWS_")
    return load_settings({k: v for k, v in env.items() if k.startswith(keys)})


@pytest.fixture
def service(
    cluster: Cluster,
    tmp_path: Path,
    object_store: ObjectStore,
    bucket: str,
) -> Iterator[PitrService]:
    env = pitr_env(
        cluster,
        tmp_path / "pitr",
        OFFSITE_DIR=str(tmp_path / "offsite"),
        **object_store.env(bucket, PREFIX),
    )
    registry = CollectorRegistry()
    pitr = PitrService(settings_for(env), registry)
    assert pitr.shipper is not None
    registry.register(OffsiteCollector(pitr.shipper))
    pitr.registry = registry  # type: ignore[attr-defined]
    pitr.barman.prepare()
    pitr.shipper.queue.prepare()
    try:
        yield pitr
    finally:
        pitr.barman.stop_receive_wal()
        pitr.engine.dispose()


def shipper_of(service: PitrService) -> Shipper:
    assert service.shipper is not None
    return service.shipper


def write_and_switch(cluster: Cluster, service: PitrService, segments: int) -> None:
    """``segments`` closed WAL segments with rows in them, archived by Barman."""
    execute(cluster.url(), "CREATE TABLE IF NOT EXISTS shipped (id serial, pad text)")
    for _ in range(segments):
        execute(cluster.url(), "INSERT INTO shipped (pad) SELECT repeat('x', 200)")
        execute(cluster.url(), "SELECT pg_switch_wal()")
    service.barman.switch_wal(archive=True)
    service.barman.archive_wal()


def drain(shipper: Shipper, limit: int = 200) -> list[str]:
    """Ship until the queue is empty; the names in the order they left the queue."""
    order = []
    for _ in range(limit):
        wals, backups = shipper.queue.wals(), shipper.queue.backups()
        shipped = shipper.ship_one()
        if shipped is None:
            return order
        assert shipped, shipper.status.last_error
        now = {w.name for w in shipper.queue.wals()} | {b.id for b in shipper.queue.backups()}
        order += [w.name for w in wals if w.name not in now]
        order += [b.id for b in backups if b.id not in now]
    raise AssertionError("the queue did not drain")


def sample(service: PitrService, name: str) -> float | None:
    text = generate_latest(service.registry).decode()  # type: ignore[attr-defined]
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def barman_cloud(service: PitrService, name: str, *args: str) -> str:
    shipper = shipper_of(service)
    return shipper.cloud.run(name, list(args), timeout=120).stdout


def test_wal_and_base_backup_reach_the_store_in_barman_cloud_layout(
    cluster: Cluster,
    service: PitrService,
    object_store: ObjectStore,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shipper = shipper_of(service)
    service.supervise()  # streaming and the first base backup
    write_and_switch(cluster, service, 3)
    shipper.scan()
    queued = [w.name for w in shipper.queue.wals()]
    backup_id = service.refresh().good_backups[-1].id
    assert [b.id for b in shipper.queue.backups()] == [backup_id]

    seen_args: list[str] = []
    watching = threading.Event()

    def watch_ps() -> None:  # what `ps` shows while Barman Cloud runs
        while not watching.is_set():
            seen_args.append(
                subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
            )
            watching.wait(0.05)

    # Every command line the uploads run with, recorded as they start (ps samples may miss
    # an upload that starts and ends between two of them).
    started: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(command: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(command, list) and "barman-cloud" in str(command[0]):
            started.append([str(part) for part in command])
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    watcher = threading.Thread(target=watch_ps)
    watcher.start()
    try:
        order = drain(shipper)
    finally:
        watching.set()
        watcher.join()
    wal_order = [name for name in order if name in queued]
    assert wal_order == queued  # in segment order
    backup_at = order.index(backup_id)
    backup = service.barman.show(backup_id)
    assert backup.end_wal is not None
    assert all(name > backup.end_wal for name in order[backup_at + 1 :] if name in queued)

    keys = object_store.keys(bucket, PREFIX + "/")
    for name in queued:
        if not name.endswith(".history"):
            assert f"{PREFIX}/dbops/wals/{name[:16]}/{name}.gz" in keys
    assert f"{PREFIX}/dbops/base/{backup_id}/backup.info" in keys
    assert f"{PREFIX}/dbops/base/{backup_id}/data.tar.gz" in keys
    listed = barman_cloud(
        service, "backup-list", "--format", "json", f"s3://{bucket}/{PREFIX}", "dbops"
    )
    assert backup_id in listed

    # What the store holds is what Barman archived: barman-cloud-wal-restore gives it back.
    last = queued[-1]
    restored = service.settings.pitr.directory / "restored-wal"
    barman_cloud(service, "wal-restore", f"s3://{bucket}/{PREFIX}", "dbops", last, str(restored))
    archive = service.settings.pitr.barman_home / "dbops" / "wals" / last[:16] / last
    assert restored.read_bytes() == archive.read_bytes()

    shipper.inspect()
    assert shipper.status.gaps == []
    assert (shipper.status.window_start or 0) > 0
    assert sample(service, "dbops_offsite_wal_gaps") == 0.0
    assert sample(service, "dbops_offsite_wal_lag_segments") == 0.0
    assert sample(service, "dbops_offsite_wal_lag_seconds") == 0.0
    assert (sample(service, "dbops_offsite_wal_last_shipped_timestamp_seconds") or 0) > 0
    assert (sample(service, "dbops_offsite_basebackup_last_shipped_timestamp_seconds") or 0) > 0
    assert (sample(service, "dbops_offsite_recovery_window_start_timestamp_seconds") or 0) > 0
    assert sample(service, 'dbops_offsite_queue_files{what="wal"}') == 0.0

    secret = object_store.secret_access_key
    assert seen_args and not any(secret in text for text in seen_args)
    programs = {Path(command[0]).name for command in started}
    assert {"barman-cloud-wal-archive", "barman-cloud-backup"} <= programs  # uploads were run
    assert not any(secret in part for command in started for part in command)
    assert secret not in generate_latest(service.registry).decode()  # type: ignore[attr-defined]


def test_an_outage_keeps_wal_queued_then_catches_up_in_order_without_a_gap(
    cluster: Cluster,
    service: PitrService,
    object_store: ObjectStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shipper = shipper_of(service)
    service.supervise()
    shipper.scan()
    drain(shipper)
    caplog.set_level(logging.INFO)
    for mode, kind in (("refuse", "unreachable"), ("unavailable", "server")):
        with object_store.outage(mode):
            write_and_switch(cluster, service, 2)
            shipper.scan()
            waiting = [w.name for w in shipper.queue.wals()]
            assert len(waiting) >= 2
            assert shipper.ship_one() is False
            assert shipper.ship_one() is False
            assert [w.name for w in shipper.queue.wals()] == waiting  # nothing dropped
            assert (
                sample(service, f'dbops_offsite_upload_failures_total{{kind="{kind}",what="wal"}}')
                == 2.0
            )
            assert sample(service, "dbops_offsite_store_up") == 0.0
            assert (sample(service, "dbops_offsite_wal_lag_segments") or 0) >= 2
            assert (sample(service, "dbops_offsite_wal_lag_seconds") or 0) > 0
            service.supervise()  # local streaming carries on meanwhile
            assert service.refresh().streaming
        assert drain(shipper)[: len(waiting)] == waiting
        assert sample(service, "dbops_offsite_store_up") == 1.0

    # Cut mid-drain: a thread ships while the store goes away under it, then comes back.
    write_and_switch(cluster, service, 6)
    shipper.scan()
    results: list[bool | None] = []
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set() and (result := shipper.ship_one()) is not None:
            results.append(result)

    thread = threading.Thread(target=worker)
    with object_store.outage("refuse"):
        thread.start()
        stop.wait(1.0)
        stop.set()
        thread.join(60)
    assert False in results
    drain(shipper)
    shipper.inspect()
    assert shipper.status.gaps == []
    assert sample(service, "dbops_offsite_wal_gaps") == 0.0
    messages = [record.getMessage() for record in caplog.records]
    assert any("failed (unreachable" in message for message in messages)
    assert any("catching up in order" in message for message in messages)
    assert object_store.secret_access_key not in caplog.text


def test_a_wrong_key_and_a_missing_bucket_are_said_plainly_and_streaming_goes_on(
    cluster: Cluster,
    service: PitrService,
    object_store: ObjectStore,
    bucket: str,
) -> None:
    shipper = shipper_of(service)
    service.supervise()
    settings = service.settings
    for broken, kind, words in (
        ({"secret_access_key": "wrong-secret-key"}, "credentials", "refused the credentials"),
        (
            {"url": f"s3://{object_store.new_bucket(create=False)}/{PREFIX}"},
            "bucket",
            "does not exist",
        ),
    ):
        from dataclasses import replace

        offsite = replace(settings.offsite, **broken)
        checks = offsite_checks(replace(settings, offsite=offsite))
        assert checks["dbops_offsite_store"]["status"] == "FAILED"
        assert words in checks["dbops_offsite_store"]["hint"]
        assert "wrong-secret-key" not in checks["dbops_offsite_store"]["hint"]
        if kind == "bucket":
            assert "OFFSITE_CREATE_BUCKET" in checks["dbops_offsite_store"]["hint"]
        failing = Shipper(offsite, settings.pitr, shipper.counters)
        failing.queue.prepare()
        write_and_switch(cluster, service, 1)
        failing.scan()
        assert failing.ship_one() is False
        assert failing.status.last_error is not None
        assert (
            sample(service, f'dbops_offsite_upload_failures_total{{kind="{kind}",what="wal"}}')
            == 1.0
        ), failing.status.last_error
        assert "wrong-secret-key" not in failing.status.last_error
        service.supervise()
        assert service.refresh().streaming
    # The bucket was not created behind anyone's back.
    assert offsite.bucket not in [
        b["Name"] for b in object_store.client().list_buckets()["Buckets"]
    ]


def test_a_partial_or_stray_object_does_not_corrupt_the_sequence(
    cluster: Cluster,
    service: PitrService,
    object_store: ObjectStore,
    bucket: str,
) -> None:
    shipper = shipper_of(service)
    service.supervise()
    shipper.scan()
    drain(shipper)
    write_and_switch(cluster, service, 2)
    shipper.scan()
    first = shipper.queue.wals()[0]
    s3 = object_store.client()
    # A cut upload left half an object under the segment's own key, and strays sit around it.
    key = f"{PREFIX}/dbops/wals/{first.name[:16]}/{first.name}.gz"
    s3.put_object(Bucket=bucket, Key=key, Body=gzip.compress(first.path.read_bytes())[:1000])
    s3.put_object(
        Bucket=bucket, Key=f"{PREFIX}/dbops/wals/{first.name[:16]}/{first.name}.partial", Body=b"x"
    )
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/dbops/wals/junk.tmp", Body=b"x")
    # A base backup upload cut before its backup.info: half a tarball and nothing else.
    cut = f"{PREFIX}/dbops/base/20260101T000000/data.tar.gz"
    s3.put_object(Bucket=bucket, Key=cut, Body=b"\x1f\x8b half a tarball")
    drain(shipper)
    shipper.apply_retention()  # retention and the listing are not thrown by it
    assert shipper.cloud.backups() and all(
        b["backup_id"] != "20260101T000000" for b in shipper.cloud.backups()
    )
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert (
        gzip.decompress(body)
        == (
            service.settings.pitr.barman_home / "dbops" / "wals" / first.name[:16] / first.name
        ).read_bytes()
    )
    shipper.inspect()
    assert shipper.status.gaps == []
    checks = offsite_checks(service.settings)
    assert checks["dbops_offsite_wal_gaps"]["status"] == "OK"

    # A segment really missing in the store is reported, not hidden.
    names = sorted(n for n in shipper.offsite_wals() if not n.endswith(".history"))
    middle = names[len(names) // 2]
    s3.delete_object(Bucket=bucket, Key=f"{PREFIX}/dbops/wals/{middle[:16]}/{middle}.gz")
    shipper.inspect()
    assert [gap.first_missing for gap in shipper.status.gaps] == [middle]
    assert sample(service, "dbops_offsite_wal_gaps") == 1.0
    checks = offsite_checks(service.settings)
    assert checks["dbops_offsite_wal_gaps"]["status"] == "FAILED"
    assert middle in checks["dbops_offsite_wal_gaps"]["hint"]


def age_backup_in_store(s3: object, bucket_name: str, backup_id: str, days: int) -> None:
    """Make a shipped base backup look ``days`` older to the store's retention."""
    from datetime import datetime, timedelta

    key = f"{PREFIX}/dbops/base/{backup_id}/backup.info"
    lines = s3.get_object(Bucket=bucket_name, Key=key)["Body"].read().decode().splitlines()  # type: ignore[attr-defined]
    aged = []
    for line in lines:
        field, _, value = line.partition("=")
        if field in ("begin_time", "end_time") and value not in ("", "None"):
            value = str(datetime.fromisoformat(value) - timedelta(days=days))
        aged.append(f"{field}={value}" if _ else line)
    s3.put_object(Bucket=bucket_name, Key=key, Body=("\n".join(aged) + "\n").encode())  # type: ignore[attr-defined]


def test_retention_deletes_only_old_backups_and_their_wal_under_our_prefix(
    cluster: Cluster,
    service: PitrService,
    object_store: ObjectStore,
    bucket: str,
) -> None:
    shipper = shipper_of(service)
    s3 = object_store.client()
    service.supervise()  # the first base backup
    ids = []
    for days in (30, 20):
        write_and_switch(cluster, service, 2)
        shipper.scan()
        drain(shipper)
        ids.append(service.refresh().good_backups[-1].id)
        age_backup_in_store(s3, bucket, ids[-1], days)
        service.base_backup()
    write_and_switch(cluster, service, 1)
    shipper.scan()
    drain(shipper)
    newest = service.refresh().good_backups[-1].id
    assert len(set([*ids, newest])) == 3
    foreign = [
        "foreign.txt",
        "other-app/dbops/wals/0000000100000000/000000010000000000000001.gz",
        "other-app/dbops/base/19700101T000000/backup.info",
        f"{PREFIX}/dumps/app/20261128T000000.dump",
    ]
    for key in foreign:
        s3.put_object(Bucket=bucket, Key=key, Body=b"not dbops' WAL or base backup")
    wals_before = shipper.offsite_wals()

    shipper.apply_retention()  # PITR_RETENTION 7 days, PITR_MIN_REDUNDANCY 1

    keys = object_store.keys(bucket)
    assert all(key in keys for key in foreign)
    assert not any(key.startswith(f"{PREFIX}/dbops/base/{ids[0]}/") for key in keys)
    # The newest backup older than the window is kept: it is what reaches the window's start.
    assert f"{PREFIX}/dbops/base/{ids[1]}/backup.info" in keys
    assert f"{PREFIX}/dbops/base/{newest}/backup.info" in keys
    kept = barman_cloud(
        service, "backup-list", "--format", "json", f"s3://{bucket}/{PREFIX}", "dbops"
    )
    assert ids[0] not in kept and ids[1] in kept and newest in kept
    wals_after = shipper.offsite_wals()
    assert len(wals_after) < len(wals_before)  # the WAL only the deleted backup needed
    begin = service.barman.show(ids[1]).begin_wal
    assert begin is not None and begin in wals_after
    shipper.inspect()
    assert shipper.status.gaps == []
