"""Restore to a point in time and the PITR drill, on a real cluster with real WAL: rows up to
the target are there, rows after it are not, and a refused restore changes nothing."""

from __future__ import annotations

import glob
import json
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from ops.pitr.drill import force_wal_out
from ops.pitr.scratch import ScratchServer
from ops.pitr.service import make_barman
from ops.pitr.state import last_drill, last_good_drill
from tests.conftest import run_ops
from tests.integration.pitr_helpers import (
    backup_role_url,
    execute,
    ops_json,
    pitr_env,
    pitr_settings,
)
from tests.pgcluster import Cluster


@pytest.fixture(scope="module")
def env(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    # As the backup role `ops db init` makes: REPLICATION and Barman's grants, no superuser.
    environment = pitr_env(cluster, tmp_path_factory.mktemp("pitr"), url=backup_role_url(cluster))
    execute(cluster.url(), "CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    ops_json("pitr", "backup", env=environment)
    try:
        yield environment
    finally:
        make_barman(pitr_settings(environment)).stop_receive_wal()


def server_now(cluster: Cluster) -> datetime:
    value: datetime = execute(cluster.url(), "SELECT clock_timestamp()")[0][0]
    return value.astimezone(UTC)


def flush_archive(cluster: Cluster, env: dict[str, str]) -> None:
    settings = pitr_settings(env)
    lsn = execute(cluster.url(), "SELECT pg_current_wal_insert_lsn()::text")[0][0]
    force_wal_out(settings, make_barman(settings), lsn)


def restored_ids(cluster: Cluster, directory: Path) -> list[int]:
    """Start the restored directory, wait for promotion, read the ledger, stop it."""
    server = ScratchServer(directory, cluster.bindir)
    try:
        server.start(timeout=120)
        server.wait_promoted("postgres", "postgres", 120)
        engine = server.engine("postgres", "postgres")
        try:
            with engine.connect() as connection:
                return list(connection.execute(text("SELECT id FROM ledger ORDER BY id")).scalars())
        finally:
            engine.dispose()
    finally:
        server.stop()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A private directory the ``postgres`` user may be handed (pytest's tmp_path is in a
    root-only tree), removed afterwards with everything restored into it."""
    root = Path(tempfile.mkdtemp(prefix="dbops-pitr-test-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_restore_to_a_time_has_the_rows_before_it_and_none_after(
    cluster: Cluster, env: dict[str, str], scratch: Path
) -> None:
    execute(cluster.url(), "INSERT INTO ledger VALUES (1, 'before'), (2, 'before')")
    target = server_now(cluster)
    execute(cluster.url(), "INSERT INTO ledger VALUES (3, 'after')")
    flush_archive(cluster, env)
    root = scratch
    result = ops_json(
        "pitr", "restore", str(root / "data"), "--target-time", target.isoformat(), env=env
    )
    assert result["destination"] == str(root / "data") and result["kept"] is None
    assert restored_ids(cluster, root / "data") == [1, 2]


def test_restore_to_an_lsn_has_the_rows_committed_before_it_and_none_after(
    cluster: Cluster, env: dict[str, str], scratch: Path
) -> None:
    execute(cluster.url(), "INSERT INTO ledger VALUES (1001, 'before lsn'), (1002, 'before lsn')")
    target = execute(cluster.url(), "SELECT pg_current_wal_insert_lsn()::text")[0][0]
    execute(cluster.url(), "INSERT INTO ledger VALUES (1003, 'after lsn')")
    flush_archive(cluster, env)
    root = scratch
    planned = ops_json(
        "pitr", "restore", str(root / "data"), "--target-lsn", target, "--dry-run", env=env
    )
    result = ops_json("pitr", "restore", str(root / "data"), "--target-lsn", target, env=env)
    assert result["target"] == f"lsn {target.upper()}"
    assert result["backup_id"] == planned["backup_id"]
    restored = restored_ids(cluster, root / "data")
    assert [i for i in restored if i > 1000] == [1001, 1002]


def test_restore_latest_recovers_every_committed_row(
    cluster: Cluster, env: dict[str, str], scratch: Path
) -> None:
    execute(cluster.url(), "INSERT INTO ledger SELECT g, 'bulk' FROM generate_series(10, 509) g")
    flush_archive(cluster, env)
    expected = [row[0] for row in execute(cluster.url(), "SELECT id FROM ledger ORDER BY id")]
    root = scratch
    ops_json("pitr", "restore", str(root / "data"), "--target", "latest", env=env)
    assert restored_ids(cluster, root / "data") == expected
    # an archive recovery that promoted onto a timeline of its own, not a crash recovery that
    # goes on writing the archive's timeline under names already archived
    assert (root / "data" / "pg_wal" / "00000002.history").is_file()


@pytest.mark.parametrize("offset", [timedelta(days=-1), timedelta(days=1)])
def test_a_target_outside_the_recovery_window_is_refused_and_nothing_changes(
    cluster: Cluster, env: dict[str, str], offset: timedelta, scratch: Path
) -> None:
    destination = scratch / "data"
    target = (server_now(cluster) + offset).isoformat()
    result = run_ops("pitr", "restore", str(destination), "--target-time", target, env=env)
    assert result.returncode == 1, result.stderr
    side = "before" if offset < timedelta(0) else "past"
    assert result.stderr.startswith("restore refused, nothing changed: time ")
    assert f"is {side} the recovery window (" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not destination.exists()


def test_a_non_empty_directory_is_refused_and_with_replace_kept_aside(
    cluster: Cluster, env: dict[str, str], scratch: Path
) -> None:
    destination = scratch / "data"
    destination.mkdir()
    (destination / "precious").write_text("still needed")
    refused = run_ops("pitr", "restore", str(destination), "--target", "latest", env=env)
    assert refused.returncode == 1
    assert "is not empty" in refused.stderr and "--replace" in refused.stderr
    assert sorted(p.name for p in destination.iterdir()) == ["precious"]

    replaced = ops_json(
        "pitr", "restore", str(destination), "--target", "latest", "--replace", env=env
    )
    kept = Path(replaced["kept"])
    assert kept.parent == destination.parent and kept.name.startswith("data.before-recover-")
    assert (kept / "precious").read_text() == "still needed"
    assert (destination / "PG_VERSION").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-time", "2026-11-28 14:05:00"], "give a time zone"),
        (["--target-time", "yesterday"], "not a time"),
        (["--target-lsn", "0/XYZ"], "not an LSN"),
    ],
)
def test_a_malformed_target_is_bad_usage_in_one_line(
    env: dict[str, str], args: list[str], message: str, scratch: Path
) -> None:
    destination = scratch / "data"
    result = run_ops("pitr", "restore", str(destination), *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not destination.exists()


def test_drill_proves_the_recovery_point_and_leaves_nothing_behind(
    cluster: Cluster, env: dict[str, str]
) -> None:
    before = set(glob.glob(f"{tempfile.gettempdir()}/dbops-pitr-drill-*"))
    result = run_ops("pitr", "drill", "--json", env=env)
    assert result.returncode == 0, (result.stdout, result.stderr)
    record = json.loads(result.stdout)
    assert record["ok"] is True and record["error"] is None
    assert record["seconds"] > 0 and record["backup_id"]
    assert set(glob.glob(f"{tempfile.gettempdir()}/dbops-pitr-drill-*")) == before
    state_file = pitr_settings(env).pitr.state_file
    assert last_drill(state_file) == last_good_drill(state_file)
    markers = execute(
        cluster.url("dbops_pitr_drill"), "SELECT marker FROM drill_marker ORDER BY committed_at"
    )
    assert [m[0] for m in markers][-2:] == ["before", "after"]
