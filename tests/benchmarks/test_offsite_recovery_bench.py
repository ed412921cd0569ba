"""Recovery from the object store against recovery from the local Barman archive, same data.

One cluster streams to the local Barman (as the sidecar does) and archives every WAL segment to
a real S3 server (moto, loopback) with barman-cloud-wal-archive. A pgbench database is loaded,
then a local base backup (``ops pitr backup``) and an off-host one (``barman-cloud-backup``,
gzip) are taken of the same data back to back, and more transactions follow. Each round
restores the latest point both ways, alternating, and starts the result until it promotes:

- local: ``ops pitr restore --target latest`` (barman recover) + replay;
- offsite: ``ops pitr restore --from offsite --target latest`` (barman-cloud-restore) + replay
  with ``barman-cloud-wal-restore`` as restore_command.

Prints the median of each and the ratio offsite/local (moto on loopback: no network latency,
so the ratio is the cost of the tools and compression, not of the distance). Asserts no time,
only that both recovered every row. DBOPS_BENCH_PITR_SCALE (pgbench scale, default 10) and
DBOPS_BENCH_ROUNDS (default 3) scale it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ops.backup.pgtools import libpq_env
from ops.pitr.drill import force_wal_out
from ops.pitr.scratch import ScratchServer
from ops.pitr.service import make_barman
from tests.conftest import run_ops
from tests.integration.offsite_helpers import (
    archiving_cluster,
    cloud_backup,
    server_reachable_barman,
    switch_and_ship,
)
from tests.integration.pitr_helpers import (
    backup_role_url,
    execute,
    ops_json,
    pitr_env,
    pitr_settings,
)
from tests.objectstore import ObjectStore, bucket, object_store  # noqa: F401

SCALE = int(os.environ.get("DBOPS_BENCH_PITR_SCALE", "10"))
ROUNDS = int(os.environ.get("DBOPS_BENCH_ROUNDS", "3"))


@pytest.fixture(scope="module")
def loaded(object_store: ObjectStore) -> Iterator[dict[str, Any]]:  # noqa: F811
    store_bucket = object_store.new_bucket()
    work = Path(tempfile.mkdtemp(prefix="dbops-offsite-bench-"))
    barman = server_reachable_barman(work / "barman")
    cluster = archiving_cluster(object_store, store_bucket, work / "wrapper", barman)
    env: dict[str, str] = {}
    try:
        env = pitr_env(cluster, work / "pitr", url=backup_role_url(cluster))
        env["PITR_BARMAN"] = str(barman)
        pgbench = str(cluster.bindir / "pgbench")
        started = time.perf_counter()
        subprocess.run(
            [pgbench, "-i", "-s", str(SCALE), "-q"],
            env=libpq_env(cluster.url(), "dbops-bench"),
            check=True,
            capture_output=True,
            timeout=1800,
        )
        ops_json("pitr", "backup", env=env)
        cloud_backup(object_store, store_bucket, cluster)
        subprocess.run(
            [pgbench, "-n", "-t", "2000", "-c", "2"],
            env=libpq_env(cluster.url(), "dbops-bench"),
            check=True,
            capture_output=True,
            timeout=1800,
        )
        settings = pitr_settings(env)
        lsn = execute(cluster.url(), "SELECT pg_current_wal_insert_lsn()::text")[0][0]
        switch_and_ship(object_store, store_bucket, cluster.url(), timeout=300)
        force_wal_out(settings, make_barman(settings), lsn)
        size = execute(cluster.url(), "SELECT pg_database_size('postgres')")[0][0]
        history = execute(cluster.url(), "SELECT count(*) FROM pgbench_history")[0][0]
        print(
            f"\nloaded pgbench scale {SCALE} ({size / 1e6:.0f} MB) and 4000 transactions, "
            f"backed up both ways, in {time.perf_counter() - started:.0f}s"
        )
        yield {
            "env": {**env, **object_store.env(store_bucket)},
            "cluster": cluster,
            "history": history,
            "work": work,
        }
    finally:
        if env:
            make_barman(pitr_settings(env)).stop_receive_wal()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def recover(loaded: dict[str, Any], *source: str) -> float:
    """Restore the latest point, start it, wait for promotion; seconds, rows checked."""
    root = Path(tempfile.mkdtemp(prefix="dbops-bench-recover-", dir=loaded["work"]))
    root.chmod(0o755)
    data = root / "data"
    server = ScratchServer(data, loaded["cluster"].bindir)
    started = time.perf_counter()
    try:
        result = run_ops("pitr", "restore", str(data), "--target", "latest", *source,
                         env=loaded["env"])  # fmt: skip
        assert result.returncode == 0, result.stderr
        server.start(timeout=600)
        server.wait_promoted("postgres", "postgres", 600)
        took = time.perf_counter() - started
        engine = server.engine("postgres", "postgres")
        try:
            with engine.connect() as connection:
                rows = connection.execute(text("SELECT count(*) FROM pgbench_history")).scalar()
        finally:
            engine.dispose()
        assert rows == loaded["history"], (source, rows, loaded["history"])
        return took
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_offsite_recovery_against_local_recovery_of_the_same_data(loaded: dict[str, Any]) -> None:
    local: list[float] = []
    offsite: list[float] = []
    for _ in range(ROUNDS):
        local.append(recover(loaded))
        offsite.append(recover(loaded, "--from", "offsite"))
    local_median, offsite_median = statistics.median(local), statistics.median(offsite)
    print(
        f"\nrecovery to the latest point, restore + replay + promotion, median of {ROUNDS}:\n"
        f"  local (barman recover):                      {local_median:.1f}s\n"
        f"  off-host (barman-cloud-restore + WAL fetch): {offsite_median:.1f}s\n"
        f"  ratio off-host / local: {offsite_median / local_median:.2f}x"
    )
