"""PITR faults on real servers: a slot lost while streaming was stopped is reported, then reset,
with a new base backup, and streaming resumes on its own."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ops.pitr.service import PitrService
from tests.conftest import run_ops
from tests.integration.pitr_helpers import (
    execute,
    ops_json,
    pitr_env,
    pitr_settings,
    start_pitr_cluster,
)
from tests.pgcluster import Cluster, wait_for


@pytest.fixture
def small_cap_cluster() -> Iterator[Cluster]:
    # 32MB: two switched segments past it and the next checkpoint drops the slot's WAL.
    cluster = start_pitr_cluster(max_slot_wal_keep_size="32MB", max_wal_size="64MB")
    try:
        yield cluster
    finally:
        cluster.stop()


def sample(registry: CollectorRegistry, name: str) -> float | None:
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_lost_slot_is_reported_then_reset_with_a_new_base_backup(
    small_cap_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = small_cap_cluster
    env = pitr_env(cluster, tmp_path / "pitr")
    registry = CollectorRegistry()
    service = PitrService(pitr_settings(env), registry)
    try:
        service.barman.prepare()
        service.supervise()  # streaming, slot, and the first base backup
        assert len(service.refresh().good_backups) == 1
        first_archived = service.snapshot.last_wal_archived if service.snapshot else None

        service.barman.stop_receive_wal()  # the sidecar is down ...
        execute(cluster.url(), "CREATE TABLE churn (id int, pad text)")
        for _ in range(5):  # ... while the server writes 5 segments past a 32MB cap
            execute(
                cluster.url(),
                "INSERT INTO churn SELECT g, repeat('x', 100) FROM generate_series(1, 1000) g",
            )
            execute(cluster.url(), "SELECT pg_switch_wal()")
        execute(cluster.url(), "CHECKPOINT")
        assert wait_for(
            lambda: (
                service.refresh().slot is not None and service.snapshot.slot.wal_status == "lost"
            ),  # type: ignore[union-attr]
            30,
            0.5,
        )
        assert sample(registry, 'dbops_pitr_slot_status{wal_status="lost"}') == 1.0
        checked = ops_json("pitr", "check", env=env, expect=1)
        assert checked["checks"]["dbops_slot"]["status"] == "FAILED"
        assert "the archive has a gap" in checked["checks"]["dbops_slot"]["hint"]

        service.supervise()  # sees the lost slot: reset, new slot, new base backup
        snapshot = service.refresh()
        assert snapshot.slot is not None and snapshot.slot.exists
        assert snapshot.slot.wal_status != "lost"
        assert len(snapshot.good_backups) == 2
        assert sample(registry, "dbops_pitr_slot_resets_total") == 1.0
        assert wait_for(lambda: service.refresh().streaming, 30, 0.5)
        assert sample(registry, 'dbops_pitr_slot_status{wal_status="lost"}') == 0.0
        assert service.snapshot is not None
        assert service.snapshot.last_wal_archived != first_archived

        status = ops_json("pitr", "status", env=env)
        newest = snapshot.good_backups[-1].id
        assert status["gaps"] == [
            {
                "after_wal": first_archived,
                "detected_at": status["gaps"][0]["detected_at"],
                "backup_id": newest,
            }
        ]
    finally:
        service.stop()


def test_recovering_the_live_server_to_a_time_then_streaming_follows_its_new_timeline(
    tmp_path: Path,
) -> None:
    """What `make recover` does, without containers: stop the server, keep its data, restore
    to T in its place, start it; the sidecar then streams the new timeline and backs it up."""
    cluster = start_pitr_cluster()
    try:
        env = pitr_env(cluster, tmp_path / "pitr")
        service = PitrService(pitr_settings(env), CollectorRegistry())
        try:
            service.barman.prepare()
            service.supervise()
            execute(cluster.url(), "CREATE TABLE orders (id int PRIMARY KEY)")
            execute(cluster.url(), "INSERT INTO orders SELECT generate_series(1, 100)")
            target = execute(cluster.url(), "SELECT clock_timestamp()")[0][0]
            execute(cluster.url(), "INSERT INTO orders SELECT generate_series(101, 150)")
            switched = run_ops("pitr", "switch-wal", env=env)
            assert switched.returncode == 0, switched.stderr

            service.barman.stop_receive_wal()
            cluster.stop_server()
            kept = cluster.root / "data-before-recover"
            cluster.datadir.rename(kept)
            restored = run_ops(
                "pitr",
                "restore",
                str(cluster.datadir),
                "--target-time",
                target.isoformat(),
                env=env,
            )
            assert restored.returncode == 0, restored.stderr
            for path in [cluster.datadir, *cluster.datadir.rglob("*")]:
                shutil.chown(path, "postgres", "postgres")
            cluster.start_server()
            assert wait_for(
                lambda: execute(cluster.url(), "SELECT NOT pg_is_in_recovery()")[0][0], 60, 0.5
            )
            assert execute(cluster.url(), "SELECT count(*), max(id) FROM orders")[0] == (100, 100)
            assert (kept / "PG_VERSION").is_file()  # the data before the recovery is still there

            service.supervise()  # sees timeline 2: resets streaming, takes a fresh base backup
            snapshot = service.refresh()
            assert snapshot.current_wal is not None and snapshot.current_wal.startswith("00000002")
            assert len(snapshot.good_backups) == 2
            assert wait_for(lambda: service.refresh().streaming, 30, 0.5)
            assert service.snapshot is not None and service.snapshot.last_wal_archived
            assert service.snapshot.last_wal_archived.startswith("00000002")
        finally:
            service.stop()
    finally:
        cluster.stop()
