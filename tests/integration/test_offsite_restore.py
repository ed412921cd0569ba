"""Point-in-time recovery from the object store alone, on a real cluster whose WAL and base
backup reached a real S3 server (moto) through Barman Cloud: no Barman catalogue, no PITR_DIR,
only the store and its credentials."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ops.pitr.scratch import ScratchServer
from tests.conftest import env_for, run_ops
from tests.integration.offsite_helpers import (
    archiving_cluster,
    cloud_backup,
    server_reachable_barman,
    switch_and_ship,
)
from tests.integration.pitr_helpers import execute
from tests.objectstore import ObjectStore
from tests.pgcluster import Cluster


@pytest.fixture(scope="module")
def store_bucket(object_store: ObjectStore) -> str:
    return object_store.new_bucket()


@pytest.fixture(scope="module")
def shipped(
    object_store: ObjectStore,
    store_bucket: str,
) -> Iterator[dict[str, Any]]:
    """Rows 1-3 committed before T, 4-6 after; a base backup before both; all WAL shipped."""
    archive = Path(tempfile.mkdtemp(prefix="dbops-archive-"))  # reachable by `postgres`
    barman = server_reachable_barman(archive / "barman")
    cluster = archiving_cluster(object_store, store_bucket, archive / "wrapper", barman)
    try:
        url = cluster.url()
        before_backup = server_now(cluster)
        execute(url, "CREATE TABLE ledger (id int PRIMARY KEY)")
        cloud_backup(object_store, store_bucket, cluster)
        execute(url, "INSERT INTO ledger SELECT generate_series(1, 3)")
        target = server_now(cluster)
        target_lsn = execute(url, "SELECT pg_current_wal_insert_lsn()::text")[0][0]
        execute(url, "INSERT INTO ledger SELECT generate_series(4, 6)")
        switch_and_ship(object_store, store_bucket, url)
        yield {
            "cluster": cluster,
            "target": target,
            "target_lsn": target_lsn,
            "before_backup": before_backup,
            "barman": barman,
        }
    finally:
        cluster.stop()
        shutil.rmtree(archive, ignore_errors=True)


def server_now(cluster: Cluster) -> datetime:
    value: datetime = execute(cluster.url(), "SELECT clock_timestamp()")[0][0]
    return value.astimezone(UTC)


def fresh_env(
    store: ObjectStore, bucket_name: str, shipped: dict[str, Any], pitr_dir: Path, **extra: str
) -> dict[str, str]:
    """A machine with no local Barman state: PITR off, PITR_DIR absent, only the store."""
    return env_for(
        shipped["cluster"].url(),
        PITR_DIR=str(pitr_dir),
        PITR_BARMAN=str(shipped["barman"]),
        **{**store.env(bucket_name), **extra},
    )


@pytest.fixture
def workdir() -> Iterator[Path]:
    # /tmp, not pytest's tmp_path: as root the restored server runs as `postgres`, which must
    # be able to reach the data directory and the wrapper beside it.
    root = Path(tempfile.mkdtemp(prefix="dbops-offsite-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def restored_ids(cluster: Cluster, directory: Path) -> list[int]:
    server = ScratchServer(directory, cluster.bindir)
    try:
        server.start(timeout=180)
        server.wait_promoted("postgres", "postgres", 180)
        engine = server.engine("postgres", "postgres")
        try:
            with engine.connect() as connection:
                return list(connection.execute(text("SELECT id FROM ledger ORDER BY id")).scalars())
        finally:
            engine.dispose()
    finally:
        server.stop()


def test_offsite_restore_to_a_time_has_the_rows_up_to_it_and_none_after(
    shipped: dict[str, Any],
    object_store: ObjectStore,
    store_bucket: str,
    workdir: Path,
) -> None:
    cluster = shipped["cluster"]
    env = fresh_env(object_store, store_bucket, shipped, workdir / "no-pitr-dir")
    data = workdir / "data"
    result = run_ops(
        "pitr", "restore", str(data), "--from", "offsite",
        "--target-time", shipped["target"].isoformat(), "--json", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    restored = json.loads(result.stdout)
    assert restored["wal"] == "fetch"
    recovery_dir = Path(restored["recovery_dir"])
    settings_text = (data / "postgresql.auto.conf").read_text()
    assert "restore_command" in settings_text and str(recovery_dir) in settings_text
    # The credentials are only in the private env file beside the data directory.
    for secret in (object_store.secret_access_key, object_store.access_key_id):
        assert secret not in settings_text
        assert secret not in result.stdout + result.stderr
        assert secret not in (recovery_dir / "restore-wal").read_text()
    assert object_store.secret_access_key in (recovery_dir / "store.env").read_text()
    assert stat.S_IMODE(recovery_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((recovery_dir / "store.env").stat().st_mode) == 0o600
    assert not (workdir / "no-pitr-dir").exists()
    assert restored_ids(cluster, data) == [1, 2, 3]


def test_offsite_restore_with_staged_wal_needs_no_barman_cloud_in_the_server(
    shipped: dict[str, Any],
    object_store: ObjectStore,
    store_bucket: str,
    workdir: Path,
) -> None:
    cluster = shipped["cluster"]
    env = fresh_env(object_store, store_bucket, shipped, workdir / "no-pitr-dir")
    data = workdir / "data"
    result = run_ops(
        "pitr", "restore", str(data), "--from", "offsite", "--wal", "stage",
        "--target-time", shipped["target"].isoformat(), "--json", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    restored = json.loads(result.stdout)
    assert restored["recovery_dir"] is None and restored["staged_wal_files"] >= 1
    settings_text = (data / "postgresql.auto.conf").read_text()
    assert "barman-cloud" not in settings_text and "dbops_offsite_wal/%f" in settings_text
    assert restored_ids(cluster, data) == [1, 2, 3]


def test_offsite_restore_latest_has_every_shipped_row(
    shipped: dict[str, Any],
    object_store: ObjectStore,
    store_bucket: str,
    workdir: Path,
) -> None:
    cluster = shipped["cluster"]
    env = fresh_env(object_store, store_bucket, shipped, workdir / "no-pitr-dir")
    data = workdir / "data"
    result = run_ops(
        "pitr", "restore", str(data), "--from", "offsite", "--target", "latest", env=env
    )
    assert result.returncode == 0, result.stderr
    assert "from the object store" in result.stdout
    assert restored_ids(cluster, data) == [1, 2, 3, 4, 5, 6]


def test_offsite_restore_to_an_lsn_stops_there_and_one_past_the_store_is_refused(
    shipped: dict[str, Any],
    object_store: ObjectStore,
    store_bucket: str,
    workdir: Path,
) -> None:
    cluster = shipped["cluster"]
    env = fresh_env(object_store, store_bucket, shipped, workdir / "no-pitr-dir")
    data = workdir / "data"
    args = ("pitr", "restore", str(data), "--from", "offsite", "--target-lsn")
    beyond = run_ops(*args, "FF/0", env=env)
    assert beyond.returncode == 1 and "past the archive" in beyond.stderr
    assert not data.exists()
    result = run_ops(*args, shipped["target_lsn"], env=env)
    assert result.returncode == 0, result.stderr
    assert restored_ids(cluster, data) == [1, 2, 3]


@pytest.mark.parametrize("where", ["before", "after"])
def test_offsite_restore_refuses_a_target_outside_the_store_and_changes_nothing(
    where: str,
    shipped: dict[str, Any],
    object_store: ObjectStore,
    store_bucket: str,
    workdir: Path,
) -> None:
    env = fresh_env(object_store, store_bucket, shipped, workdir / "no-pitr-dir")
    moment = (
        shipped["before_backup"] - timedelta(seconds=1)
        if where == "before"
        else datetime.now(UTC) + timedelta(hours=1)
    )
    data = workdir / "data"
    result = run_ops(
        "pitr", "restore", str(data), "--from", "offsite",
        "--target-time", moment.isoformat(), env=env,
    )  # fmt: skip
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing changed" in lines[0], lines
    assert ("before the recovery window" if where == "before" else "past the recovery window") in (
        lines[0]
    )
    assert "Traceback" not in result.stderr
    assert not data.exists()
    assert not data.with_name("data.dbops-offsite").exists()


def test_offsite_restore_with_wrong_credentials_is_one_clear_line(
    shipped: dict[str, Any],
    object_store: ObjectStore,
    store_bucket: str,
    workdir: Path,
) -> None:
    wrong = "wrong-secret-" + os.urandom(6).hex()
    env = fresh_env(object_store, store_bucket, shipped, workdir / "p", AWS_SECRET_ACCESS_KEY=wrong)
    data = workdir / "data"
    result = run_ops(
        "pitr", "restore", str(data), "--from", "offsite", "--target", "latest", env=env
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the credentials" in lines[0], lines
    assert wrong not in result.stderr + result.stdout
    assert not data.exists()


def test_offsite_restore_refuses_a_non_empty_directory_and_keeps_what_it_replaces(
    shipped: dict[str, Any],
    object_store: ObjectStore,
    store_bucket: str,
    workdir: Path,
) -> None:
    env = fresh_env(object_store, store_bucket, shipped, workdir / "p")
    data = workdir / "data"
    data.mkdir()
    (data / "precious").write_text("keep me")
    args = ("pitr", "restore", str(data), "--from", "offsite", "--target", "latest")
    refused = run_ops(*args, env=env)
    assert refused.returncode == 1 and "not empty" in refused.stderr
    assert sorted(os.listdir(data)) == ["precious"]
    replaced = run_ops(*args, "--replace", "--json", env=env)
    assert replaced.returncode == 0, replaced.stderr
    kept = Path(json.loads(replaced.stdout)["kept"])
    assert (kept / "precious").read_text() == "keep me"
    assert (data / "PG_VERSION").exists()


def test_offsite_restore_without_offsite_settings_is_a_usage_error(
    shipped: dict[str, Any], workdir: Path
) -> None:
    env = env_for(shipped["cluster"].url(), PITR_DIR=str(workdir / "p"))
    env.pop("OFFSITE_S3_URL", None)
    result = run_ops(
        "pitr", "restore", str(workdir / "d"), "--from", "offsite", "--target", "latest", env=env
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "OFFSITE_S3_URL (unset): recovery from the object store needs it"
    )


def test_a_segment_missing_from_the_store_stops_recovery_instead_of_promoting_early(
    shipped: dict[str, Any],
    object_store: ObjectStore,
    store_bucket: str,
    workdir: Path,
) -> None:
    """Last in the module: it removes a segment from the shared store. Recovery to T cannot
    get past the hole, so the server stops with PostgreSQL's own reason, at once."""
    import time

    from ops.pitr.scratch import ScratchError

    cluster = shipped["cluster"]
    wal_prefix = "dbops/dbops/wals/"
    holding_t = sorted(object_store.keys(store_bucket, wal_prefix))[-1]  # rows 1-6 and T
    execute(cluster.url(), "INSERT INTO ledger VALUES (7)")
    switch_and_ship(object_store, store_bucket, cluster.url())  # the store reaches past it
    object_store.client().delete_object(Bucket=store_bucket, Key=holding_t)
    env = fresh_env(object_store, store_bucket, shipped, workdir / "no-pitr-dir")
    data = workdir / "data"
    result = run_ops(
        "pitr", "restore", str(data), "--from", "offsite",
        "--target-time", shipped["target"].isoformat(), env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    started = time.monotonic()
    with pytest.raises(ScratchError, match="recovery ended before configured recovery target"):
        restored_ids(cluster, data)
    assert time.monotonic() - started < 60
