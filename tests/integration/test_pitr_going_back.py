"""Going back after a recovery, as README says (the data from before it put back in place):
the sidecar streams again on the earlier timeline, takes a fresh base backup, and a restore to
the latest point has what was written after going back."""

from __future__ import annotations

import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry

from ops.pitr.service import PitrService
from tests.conftest import run_ops
from tests.integration.pitr_helpers import execute, pitr_env, pitr_settings, start_pitr_cluster
from tests.integration.test_pitr_faults import restored_ledger
from tests.pgcluster import Cluster, wait_for


def swap_data(cluster: Cluster, replacement: Path, keep_as: Path) -> None:
    """Stopped server: its data directory becomes ``keep_as``, ``replacement`` takes its place."""
    cluster.stop_server()
    cluster.datadir.rename(keep_as)
    replacement.rename(cluster.datadir)
    for path in [cluster.datadir, *cluster.datadir.rglob("*")]:
        shutil.chown(path, "postgres", "postgres")
    cluster.start_server()
    assert wait_for(lambda: execute(cluster.url(), "SELECT NOT pg_is_in_recovery()")[0][0], 60)


def test_going_back_after_a_recovery_streams_the_earlier_timeline_again(tmp_path: Path) -> None:
    cluster = start_pitr_cluster()
    try:
        env = pitr_env(cluster, tmp_path / "pitr")
        service = PitrService(pitr_settings(env), CollectorRegistry())
        try:
            service.barman.prepare()
            service.supervise()
            execute(cluster.url(), "CREATE TABLE ledger (id bigint PRIMARY KEY, pad text)")
            execute(cluster.url(), "INSERT INTO ledger SELECT generate_series(1, 100), 'a'")
            assert run_ops("pitr", "switch-wal", env=env).returncode == 0

            # make recover (latest point), without containers
            service.barman.stop_receive_wal()
            cluster.stop_server()
            before = cluster.root / "data-before-recover"
            cluster.datadir.rename(before)
            restored = run_ops("pitr", "restore", str(cluster.datadir), "--target", "latest",
                               env=env)  # fmt: skip
            assert restored.returncode == 0, restored.stderr
            for path in [cluster.datadir, *cluster.datadir.rglob("*")]:
                shutil.chown(path, "postgres", "postgres")
            cluster.start_server()
            assert wait_for(
                lambda: execute(cluster.url(), "SELECT NOT pg_is_in_recovery()")[0][0], 60
            )
            service.supervise()  # timeline 2: streaming follows it, a fresh base backup
            assert wait_for(lambda: service.refresh().streaming, 30, 0.5)
            execute(cluster.url(), "INSERT INTO ledger SELECT generate_series(101, 120), 'b'")
            assert run_ops("pitr", "switch-wal", env=env).returncode == 0

            # going back: the data from before the recovery, in place again (timeline 1)
            service.barman.stop_receive_wal()
            swap_data(cluster, before, cluster.root / "data-recovered")
            timeline = execute(cluster.url(), "SELECT pg_walfile_name(pg_current_wal_lsn())")
            assert timeline[0][0].startswith("00000001")
            service.supervise()
            assert wait_for(lambda: service.refresh().streaming, 60, 0.5), service.snapshot
            newest = service.barman.show(service.refresh().good_backups[-1].id)
            assert newest.timeline == 1  # a fresh base backup of the earlier timeline
            execute(cluster.url(), "INSERT INTO ledger SELECT generate_series(201, 230), 'c'")
            switched = run_ops("pitr", "switch-wal", env=env)
            assert switched.returncode == 0, switched.stdout + switched.stderr
            ids, _ = restored_ledger(cluster, env)
            assert ids == set(range(1, 101)) | set(range(201, 231))
        finally:
            service.stop()
    finally:
        cluster.stop()
