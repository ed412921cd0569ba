"""PITR_DRILL_SOURCE=offsite: the drill proves the object store's copy, not the local one.

The cluster streams to the local Barman (as in the stack) and archives every WAL segment to a
real S3 server (moto) with barman-cloud-wal-archive; a base backup is taken both ways. The
drill must restore the store's base backup, replay the store's WAL, and find exactly the
marker committed before T.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.pitr.service import make_barman
from ops.pitr.state import last_drill
from tests.integration.offsite_helpers import (
    archiving_cluster,
    cloud_backup,
    server_reachable_barman,
)
from tests.integration.pitr_helpers import (
    backup_role_url,
    execute,
    ops_json,
    pitr_env,
    pitr_settings,
)
from tests.objectstore import ObjectStore


@pytest.fixture(scope="module")
def setup(object_store: ObjectStore) -> Iterator[dict[str, Any]]:
    store_bucket = object_store.new_bucket()
    work = Path(tempfile.mkdtemp(prefix="dbops-offsite-drill-"))
    barman = server_reachable_barman(work / "barman")
    cluster = archiving_cluster(object_store, store_bucket, work / "wrapper", barman)
    env: dict[str, str] = {}
    try:
        env = pitr_env(cluster, work / "pitr", url=backup_role_url(cluster))
        env["PITR_BARMAN"] = str(barman)
        local = ops_json("pitr", "backup", env=env)["backup"]["id"]
        time.sleep(1.1)  # Barman's backup ids are seconds: the store's must differ
        cloud_backup(object_store, store_bucket, cluster)
        execute(cluster.url(), "SELECT pg_switch_wal()")
        yield {"env": env, "bucket": store_bucket, "local_backup": local, "work": work}
    finally:
        if env:
            make_barman(pitr_settings(env)).stop_receive_wal()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_offsite_drill_restores_the_stores_backup_and_wal_and_records_it(
    setup: dict[str, Any],
    object_store: ObjectStore,
) -> None:
    env = {**setup["env"], **object_store.env(setup["bucket"]), "PITR_DRILL_SOURCE": "offsite"}
    record = ops_json("pitr", "drill", env=env)
    assert record["ok"], record["error"]
    assert record["source"] == "offsite"
    assert record["backup_id"] != setup["local_backup"]
    stored = {key.split("/")[3] for key in object_store.keys(setup["bucket"], "dbops/dbops/base/")}
    assert record["backup_id"] in stored
    saved = last_drill(pitr_settings(setup["env"]).pitr.state_file)
    assert saved is not None and saved.ok and saved.source == "offsite"


def test_offsite_drill_fails_clearly_when_the_store_refuses_the_credentials(
    setup: dict[str, Any],
    object_store: ObjectStore,
) -> None:
    env = {
        **setup["env"],
        **object_store.env(setup["bucket"]),
        "PITR_DRILL_SOURCE": "offsite",
        "AWS_SECRET_ACCESS_KEY": "not-the-secret-at-all",
    }
    record = ops_json("pitr", "drill", env=env, expect=1)
    assert not record["ok"] and record["source"] == "offsite"
    assert "refused the credentials" in record["error"]
    assert "not-the-secret-at-all" not in record["error"]
    saved = last_drill(pitr_settings(setup["env"]).pitr.state_file)
    assert saved is not None and not saved.ok


def test_offsite_drill_source_without_a_store_is_a_config_error(
    setup: dict[str, Any],
) -> None:
    from tests.conftest import run_ops

    env = {**setup["env"], "PITR_DRILL_SOURCE": "offsite"}
    env.pop("OFFSITE_S3_URL", None)
    result = run_ops("pitr", "drill", env=env)
    assert result.returncode == 2
    assert "PITR_DRILL_SOURCE offsite: needs OFFSITE_S3_URL" in result.stderr
