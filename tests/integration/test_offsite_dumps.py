"""Verified dumps off host, against a real PostgreSQL and a real S3 server (moto, credentials
enforced): the round trip with no local backups left, outages mid-upload, refused credentials,
a missing bucket, hostile objects in the store, and retention that leaves others' objects."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from ops.backup.manifest import BackupDirectory
from ops.backup.service import BackupService
from ops.daemon import build_components
from ops.offsite.dumpqueue import DumpQueue
from ops.offsite.dumps import (
    catch_up,
    data_keys,
    manifest_key,
    ship_pending,
    shipping_state,
    transfer_config,
)
from ops.offsite.dumpservice import DumpShippingService
from ops.settings import Settings
from tests.conftest import Server, env_for
from tests.integration.backup_helpers import REPO, ops, populate, settings_for
from tests.objectstore import ObjectStore


@pytest.fixture
def source(migrated_db: URL) -> URL:
    populate(migrated_db)
    return migrated_db


@pytest.fixture
def target(pg: Server) -> Iterator[str]:
    name = f"dbops_offsite_{uuid.uuid4().hex[:10]}"
    yield name
    pg.drop_database(name)


def offsite_env(store: ObjectStore, name: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**store.env(name), "OFFSITE_DIR": str(tmp_path / "offsite"), **extra}


def verified_backup(url: URL, directory: Path, env: dict[str, str]) -> str:
    done = ops(url, directory, "backup", "run", "--json", **env)
    assert done.returncode == 0, done.stderr
    backup_id = str(json.loads(done.stdout)["backup"]["id"])
    checked = ops(url, directory, "backup", "verify", backup_id, **env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return backup_id


def row_counts(url: URL) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {
                "payload": connection.execute(text("SELECT count(*) FROM payload")).scalar_one(),
                "mixed": connection.execute(
                    text('SELECT count(*) FROM "Odd Schema"."Mixed Case"')
                ).scalar_one(),
            }
    finally:
        engine.dispose()


def database_exists(pg: Server, name: str) -> bool:
    with pg.admin_engine().connect() as connection:
        return bool(
            connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).scalar()
        )


def ops_watching_ps(
    url: URL, directory: Path, *args: str, **extra: str
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``ops ARGS`` with the command line of every process seen while it runs (what ``ps``
    shows: pg_restore and any other child included)."""
    env = env_for(url, BACKUP_DIR=str(directory), **extra)
    seen: set[str] = set()
    with subprocess.Popen(
        [sys.executable, "-m", "ops.cli", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    with contextlib.suppress(OSError):
                        seen.add((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            time.sleep(0.02)
        out, err = process.communicate(timeout=5)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), seen


def no_secret(store: ObjectStore, *texts: str) -> None:
    for shown in texts:
        assert store.secret_access_key not in shown
        assert store.access_key_id not in shown


def test_dump_round_trip_restores_from_the_store_with_no_local_backups(
    source: URL,
    backups: Path,
    tmp_path: Path,
    object_store: ObjectStore,
    bucket: str,
    pg: Server,
    target: str,
) -> None:
    env = offsite_env(object_store, bucket, tmp_path)
    backup_id = verified_backup(source, backups, env)
    settings = settings_for(source, backups, **env)
    manifest = BackupDirectory(backups).get(backup_id)
    assert manifest is not None

    shipped = ops(source, backups, "backup", "ship", **env)
    assert shipped.returncode == 0, shipped.stderr
    assert f"shipped {backup_id}" in shipped.stdout
    keys = object_store.keys(bucket, "dbops/dumps/")
    assert manifest_key(settings.offsite, manifest.database, backup_id) in keys
    assert next(k for _, k in data_keys(settings.offsite, manifest)) in keys
    assert shipping_state(settings.offsite).queued_files == 0
    assert shipping_state(settings.offsite).last_shipped is not None

    shutil.rmtree(backups)  # the host's backups are gone
    listed = ops(source, backups, "backup", "list", "--offsite", **env)
    assert listed.returncode == 0, listed.stderr
    assert backup_id in listed.stdout
    restored, commands = ops_watching_ps(
        source, backups, "backup", "restore", "--from", "offsite", backup_id,
        f"--target-db={target}", **env,
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    assert row_counts(pg.url(target)) == row_counts(source) == {"payload": 2000, "mixed": 50}
    assert any("pg_restore" in command for command in commands)  # the watch saw the children
    no_secret(object_store, *commands)
    assert not backups.exists()  # nothing was left behind where the backups were
    no_secret(object_store, shipped.stdout, shipped.stderr, restored.stdout, restored.stderr)
    no_secret(object_store, listed.stdout, listed.stderr)
    no_secret(object_store, (tmp_path / "offsite" / "dumps-queue.json").read_text())


def test_directory_format_dump_goes_up_in_parts_and_comes_back(
    source: URL,
    backups: Path,
    tmp_path: Path,
    object_store: ObjectStore,
    bucket: str,
    pg: Server,
    target: str,
) -> None:
    engine = create_engine(source)
    with engine.begin() as connection:  # ~12 MB of data that pg_dump stores as it is
        connection.execute(
            text(
                "CREATE TABLE blob AS SELECT g AS k, "
                "(SELECT string_agg(md5(random()::text || g || s), '') "
                " FROM generate_series(1, 200) s) AS v FROM generate_series(1, 2000) g"
            )
        )
    engine.dispose()
    env = offsite_env(
        object_store, bucket, tmp_path, BACKUP_FORMAT="directory", BACKUP_COMPRESSION="none"
    )
    backup_id = verified_backup(source, backups, env)
    settings = settings_for(source, backups, **env)
    catch_up(settings)
    parts: list[str] = []
    from ops.offsite.store import client

    s3 = client(settings.offsite)
    s3.meta.events.register("before-send.s3.UploadPart", lambda **kw: parts.append("part"))
    report = ship_pending(settings, s3=s3, transfer=transfer_config(5 << 20, 5 << 20))
    assert report.shipped == [backup_id] and report.error is None
    assert len(parts) >= 2, "the biggest file should have gone up in several parts"

    before = sorted(p.name for p in backups.iterdir())
    restored = ops(
        source, backups, "backup", "restore", "--from", "offsite", backup_id,
        f"--target-db={target}", **env,
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    assert row_counts(pg.url(target)) == row_counts(source)
    # the staging directory (inside BACKUP_DIR, which exists here) is gone afterwards
    assert sorted(p.name for p in backups.iterdir()) == before


def test_store_cut_mid_upload_keeps_the_queue_and_ships_in_order_when_back(
    source: URL,
    backups: Path,
    tmp_path: Path,
    object_store: ObjectStore,
    bucket: str,
) -> None:
    engine = create_engine(source)
    with engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE blob AS SELECT g AS k, "
                "(SELECT string_agg(md5(random()::text || g || s), '') "
                " FROM generate_series(1, 200) s) AS v FROM generate_series(1, 1200) g"
            )
        )
    engine.dispose()
    env = offsite_env(object_store, bucket, tmp_path, BACKUP_COMPRESSION="none")
    first = verified_backup(source, backups, env)
    second = verified_backup(source, backups, env)
    settings = settings_for(source, backups, **env)
    assert catch_up(settings) == [first, second]

    from ops.offsite.store import client

    s3 = client(settings.offsite, retries=1)
    sent: list[int] = []

    def cut_after_first_part(**_: Any) -> None:
        sent.append(1)
        if len(sent) == 2:
            object_store.proxy.set_mode("refuse")  # the store goes away mid-upload

    s3.meta.events.register("before-send.s3.UploadPart", cut_after_first_part)
    failures: list[str] = []
    report = ship_pending(
        settings, s3=s3, transfer=transfer_config(5 << 20, 5 << 20), on_failure=failures.append
    )
    assert report.shipped == [] and report.error is not None
    assert report.error.kind == "unreachable" and failures == ["unreachable"]
    state = DumpQueue(settings.offsite.directory).read()
    assert [p.id for p in state.pending] == [first, second]
    assert state.failures == 1 and state.next_attempt is not None

    # Meanwhile local backups carry on, and join the queue behind the others.
    third = verified_backup(source, backups, env)
    assert catch_up(settings) == [third]
    again = ship_pending(settings)  # still in its backoff: no attempt at all
    assert again.shipped == [] and again.deferred_until is not None
    with object_store.outage("unavailable"):
        failed = ship_pending(settings, ignore_backoff=True, on_failure=failures.append)
    assert failed.error is not None and failed.error.kind == "server"
    assert [p.id for p in DumpQueue(settings.offsite.directory).read().pending] == [
        first,
        second,
        third,
    ]

    object_store.proxy.set_mode("pass")
    done = ops(source, backups, "backup", "ship", **env)  # the store is back
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:3] == [f"shipped {i}" for i in (first, second, third)]
    shipped = DumpQueue(settings.offsite.directory).read().shipped
    assert shipped[first] <= shipped[second] <= shipped[third]
    keys = object_store.keys(bucket, "dbops/dumps/")
    for backup_id in (first, second, third):
        assert any(k.endswith(f"/{backup_id}.json") for k in keys)
        assert any(k.endswith(f"/{backup_id}.dump") for k in keys)


@pytest.mark.parametrize("fault", ["credentials", "bucket"])
def test_refused_credentials_or_missing_bucket_are_one_line_and_backups_go_on(
    fault: str,
    source: URL,
    backups: Path,
    tmp_path: Path,
    object_store: ObjectStore,
    bucket: str,
) -> None:
    env = offsite_env(object_store, bucket, tmp_path)
    if fault == "credentials":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret-" + uuid.uuid4().hex
        expected = "refused the credentials"
    else:
        env["OFFSITE_S3_URL"] = f"s3://{object_store.new_bucket(create=False)}/dbops"
        expected = "does not exist"
    backup_id = verified_backup(source, backups, env)
    failed = ops(source, backups, "backup", "ship", **env)
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ship failed: ") and expected in lines[0]
    assert env["AWS_SECRET_ACCESS_KEY"] not in failed.stderr + failed.stdout
    settings = settings_for(source, backups, **env)
    assert [p.id for p in DumpQueue(settings.offsite.directory).read().pending] == [backup_id]
    after = ops(source, backups, "backup", "run", **env)
    assert after.returncode == 0, after.stderr  # local backups do not care
    listed = ops(source, backups, "backup", "list", "--offsite", **env)
    assert listed.returncode == 1 and len(listed.stderr.strip().splitlines()) == 1
    assert expected in listed.stderr


@pytest.fixture
def shipped(
    source: URL,
    backups: Path,
    tmp_path: Path,
    object_store: ObjectStore,
    bucket: str,
) -> tuple[Settings, dict[str, str], str]:
    env = offsite_env(object_store, bucket, tmp_path)
    backup_id = verified_backup(source, backups, env)
    done = ops(source, backups, "backup", "ship", **env)
    assert done.returncode == 0, done.stderr
    shutil.rmtree(backups)
    return settings_for(source, backups, **env), env, backup_id


def _manifest(store: ObjectStore, name: str, key: str) -> dict[str, Any]:
    body = store.client().get_object(Bucket=name, Key=key)["Body"].read()
    return dict(json.loads(body))


@pytest.mark.parametrize(
    "damage",
    [
        "truncated data",
        "wrong checksum",
        "hostile path",
        "id of another name",
        "small size",
        "size beyond the disk",
    ],
)
def test_damaged_or_hostile_objects_in_the_store_are_refused_before_pg_restore(
    damage: str,
    shipped: tuple[Settings, dict[str, str], str],
    source: URL,
    backups: Path,
    object_store: ObjectStore,
    bucket: str,
    pg: Server,
    target: str,
) -> None:
    settings, env, backup_id = shipped
    s3 = object_store.client()
    key = manifest_key(settings.offsite, settings.db.database, backup_id)
    data_key = key.removesuffix(".json") + ".dump"
    manifest = _manifest(object_store, bucket, key)
    expected = {
        "truncated data": "sha256 does not match",
        "wrong checksum": "sha256 does not match",
        "hostile path": "field path",
        "id of another name": "field id",
        "small size": "bytes, more than its manifest's",
        "size beyond the disk": "free in",
    }[damage]
    if damage == "truncated data":
        body = s3.get_object(Bucket=bucket, Key=data_key)["Body"].read()
        s3.put_object(Bucket=bucket, Key=data_key, Body=body[: len(body) // 2])
        manifest["size_bytes"] = len(body) * 4  # even a manifest that allows more
    elif damage == "wrong checksum":
        name = next(iter(manifest["files"]))
        manifest["files"][name] = hashlib.sha256(b"something else").hexdigest()
    elif damage == "hostile path":
        manifest["path"] = "../../../etc/passwd"
    elif damage == "id of another name":
        manifest["id"] = "20200101T000000Z-abcdef"
    elif damage == "small size":
        manifest["size_bytes"] = 10
    else:
        manifest["size_bytes"] = 1 << 60
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(manifest).encode())

    restored = ops(
        source, backups, "backup", "restore", "--from", "offsite", backup_id,
        f"--target-db={target}", **env,
    )  # fmt: skip
    assert restored.returncode == 1
    lines = restored.stderr.strip().splitlines()
    assert len(lines) == 1, restored.stderr
    assert lines[0].startswith("restore failed: ") and expected in lines[0]
    assert not database_exists(pg, target)
    assert not backups.exists() or not any(backups.iterdir())  # the staging area is gone


def test_restore_from_offsite_refuses_a_name_that_is_not_a_backup_id(
    shipped: tuple[Settings, dict[str, str], str], source: URL, backups: Path
) -> None:
    _, env, _ = shipped
    refused = ops(
        source, backups, "backup", "restore", "--from", "offsite", "../../etc/passwd",
        "--target-db=x", **env,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "is not a backup id" in refused.stderr and "ops backup list --offsite" in refused.stderr


def test_offsite_retention_deletes_only_what_dbops_wrote(
    source: URL,
    backups: Path,
    tmp_path: Path,
    object_store: ObjectStore,
    bucket: str,
) -> None:
    keep_one = {
        "BACKUP_KEEP_LAST": "1",
        "BACKUP_KEEP_DAILY": "0",
        "BACKUP_KEEP_WEEKLY": "0",
        "BACKUP_KEEP_MONTHLY": "0",
    }
    env = offsite_env(object_store, bucket, tmp_path, **keep_one)
    first = verified_backup(source, backups, env)
    assert ops(source, backups, "backup", "ship", **env).returncode == 0
    second = verified_backup(source, backups, env)
    assert ops(source, backups, "backup", "ship", **env).returncode == 0
    settings = settings_for(source, backups, **env)
    folder = manifest_key(settings.offsite, settings.db.database, first).rsplit("/", 1)[0]
    s3 = object_store.client()
    foreign = {
        f"{folder}/README.txt": b"notes of the operator",
        f"{folder}/20200101T000000Z-abcdef.dump": b"not ours",
        f"{folder}/20200102T000000Z-abcdef.json": b"{not json",
        f"{folder}/other/{first}.dump": b"nested",
    }
    for key, body in foreign.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    # an object at a name dbops would use, but without dbops' mark: survives too
    planted = f"{folder}/{first}.dump"
    s3.put_object(Bucket=bucket, Key=planted, Body=b"overwritten by someone")

    dry = ops(source, backups, "backup", "prune", "--offsite", "--dry-run", **env)
    assert dry.returncode == 0 and f"would delete {first}" in dry.stdout
    done = ops(source, backups, "backup", "prune", "--offsite", "--json", **env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["deleted"] == [first] and result["left_alone"] == [planted]
    keys = set(object_store.keys(bucket))
    assert set(foreign) <= keys and planted in keys
    assert f"{folder}/{first}.json" not in keys
    assert {f"{folder}/{second}.json", f"{folder}/{second}.dump"} <= keys  # newest verified


def test_local_retention_keeps_a_backup_still_waiting_for_the_store(
    source: URL,
    backups: Path,
    tmp_path: Path,
    object_store: ObjectStore,
    bucket: str,
) -> None:
    env = offsite_env(
        object_store,
        bucket,
        tmp_path,
        BACKUP_KEEP_LAST="1",
        BACKUP_KEEP_DAILY="0",
        BACKUP_KEEP_WEEKLY="0",
        BACKUP_KEEP_MONTHLY="0",
    )
    first = verified_backup(source, backups, env)
    with object_store.outage("refuse"):
        assert ops(source, backups, "backup", "ship", **env).returncode == 1
        verified_backup(source, backups, env)
    assert BackupDirectory(backups).get(first) is not None
    dry = ops(source, backups, "backup", "prune", "--dry-run", **env)
    assert f"keep {first}: queued for the off-host store" in dry.stdout


def test_sidecar_queues_a_backup_when_its_drill_passes_and_ships_it(
    source: URL,
    backups: Path,
    tmp_path: Path,
    object_store: ObjectStore,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:

    from ops.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging(level="debug")  # even at debug, the SDK's request logs stay out
    root.addHandler(caplog.handler)
    try:
        ship_through_the_sidecar(source, backups, tmp_path, object_store, bucket, caplog)
    finally:
        root.handlers[:], root.level = saved


def ship_through_the_sidecar(
    source: URL,
    backups: Path,
    tmp_path: Path,
    object_store: ObjectStore,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prometheus_client import CollectorRegistry

    from ops.backup.runner import run_backup

    settings = settings_for(source, backups, **offsite_env(object_store, bucket, tmp_path))
    registry = CollectorRegistry()
    components = build_components(settings, registry)
    service = next(c for c in components if isinstance(c, BackupService))
    shipper = next(c for c in components if isinstance(c, DumpShippingService))
    assert service.after_verification == shipper.verified
    taken = run_backup(settings)
    service.verify_job()  # the drill passes: queued at once
    assert [p.id for p in DumpQueue(settings.offsite.directory).read().pending] == [taken.id]
    shipper.ship_job()
    assert DumpQueue(settings.offsite.directory).read().pending == []
    value = registry.get_sample_value("dbops_offsite_dump_last_shipped_timestamp_seconds")
    assert value is not None and value > 0
    assert any(k.endswith(f"/{taken.id}.json") for k in object_store.keys(bucket))
    assert f"backup {taken.id} shipped to the off-host store" in caplog.text
    no_secret(object_store, caplog.text)


def test_without_offsite_url_the_sidecar_has_no_dump_shipping(source: URL, backups: Path) -> None:
    from prometheus_client import CollectorRegistry

    components = build_components(settings_for(source, backups), CollectorRegistry())
    assert not any(isinstance(c, DumpShippingService) for c in components)
    refused = ops(source, backups, "backup", "ship")
    assert refused.returncode == 2 and refused.stderr.startswith("OFFSITE_S3_URL (unset)")
    probe = (
        "import sys; from prometheus_client import CollectorRegistry; "
        "from ops.daemon import build_components; from ops.settings import load_settings; "
        "from ops.backup.prune import prune; "
        "s = load_settings(); build_components(s, CollectorRegistry()); prune(s, dry_run=True); "
        "print(sorted(m for m in sys.modules if m.startswith(('boto', 'ops.offsite.d'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        env=env_for(source, BACKUP_DIR=str(backups)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]" and loaded.stderr == ""


def test_shipping_never_follows_a_dump_replaced_by_a_link_outside_the_directory(
    source: URL,
    backups: Path,
    tmp_path: Path,
    outside: Path,
    object_store: ObjectStore,
    bucket: str,
) -> None:
    env = offsite_env(object_store, bucket, tmp_path)
    backup_id = verified_backup(source, backups, env)
    assert catch_up(settings_for(source, backups, **env)) == [backup_id]  # queued, then swapped
    dump = backups / f"{backup_id}.dump"
    dump.unlink()
    dump.symlink_to(outside / "secret.dump")

    done = ops(source, backups, "backup", "ship", **env)
    assert done.returncode == 0, done.stderr
    assert f"not shipped {backup_id}: " in done.stdout and "symbolic link" in done.stdout
    assert object_store.keys(bucket) == []  # not a byte of it left the host
    # and a scan never queues it again: a dump that is a link is no backup
    again = ops(source, backups, "backup", "ship", **env)
    assert again.returncode == 0 and "0 backup(s) queued" in again.stdout
    assert "is a symbolic link; not followed" in again.stderr
