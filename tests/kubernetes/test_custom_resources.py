"""What the CRD schemas cannot say about our custom resources: the CEL rules of the CRDs and
the checks of CloudNativePG's admission webhook that our fields touch (cloudnative-pg v1.30.0,
internal/webhook/v1/cluster_webhook.go), and the references between the Cluster, its
ScheduledBackup, the ObjectStore and the dbops roles, pinned to postgresql.cnpg.io/v1,
barmancloud.cnpg.io/v1 and monitoring.coreos.com/v1."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from db.roles import RoleSpec
from ops.settings import load_settings
from tests.kubernetes.kube import DEPLOY, ROOT, Resource, find, one, render
from tests.kubernetes.test_schemas import problems

PLUGIN = "barman-cloud.cloudnative-pg.io"
# Barman's server name of the compose stack's sidecar (ops/pitr): its folder in the object store.
COMPOSE_SERVER_NAME = "dbops"
# Roles the operator keeps for itself (pkg/postgres IsRoleReserved).
RESERVED_ROLES = {"postgres", "streaming_replica"}


@pytest.fixture(scope="module")
def cnpg(rendered: dict[str, list[Resource]]) -> list[Resource]:
    return rendered["cnpg-kube-prometheus"]


@pytest.fixture(scope="module")
def from_compose() -> Iterator[list[Resource]]:
    """The cnpg overlay with the from-compose component, as README tells users to add it."""
    path = DEPLOY / "overlays" / f".test-{uuid.uuid4().hex[:8]}"
    source = DEPLOY / "overlays" / "cnpg-kube-prometheus"
    shutil.copytree(source, path)
    try:
        text = (path / "kustomization.yaml").read_text()
        component = "  - ../../components/cloudnative-pg\n"
        text = text.replace(component, component + component.replace("pg\n", "pg/from-compose\n"))
        (path / "kustomization.yaml").write_text(text)
        yield render(path)
    finally:
        shutil.rmtree(path)


def cluster_of(resources: list[Resource]) -> dict[str, Any]:
    return one(resources, "Cluster", "dbops-db")


def test_object_store_leaves_server_name_to_the_cluster(cnpg: list[Resource]) -> None:
    # CRD CEL rule on spec.configuration: !has(self.serverName)
    store = one(cnpg, "ObjectStore", "dbops-offsite")
    assert "serverName" not in store["spec"]["configuration"]
    assert store["spec"]["configuration"]["destinationPath"].startswith("s3://")


def test_object_store_credentials_use_the_compose_variable_names(cnpg: list[Resource]) -> None:
    credentials = one(cnpg, "ObjectStore", "dbops-offsite")["spec"]["configuration"][
        "s3Credentials"
    ]
    assert credentials["accessKeyId"]["key"] == "AWS_ACCESS_KEY_ID"
    assert credentials["secretAccessKey"]["key"] == "AWS_SECRET_ACCESS_KEY"


def test_cluster_names_its_image_one_way_at_the_compose_major_version(cnpg: list[Resource]) -> None:
    spec = cluster_of(cnpg)["spec"]
    # CRD CEL rule on spec: !(has(self.imageCatalogRef) && has(self.imageName))
    assert not ("imageCatalogRef" in spec and "imageName" in spec)
    compose = (ROOT / "docker-compose.yml").read_text()
    (major,) = re.findall(r"POSTGRES_IMAGE:-postgres:(\d+)", compose)
    tag = spec["imageName"].rsplit(":", 1)[1]
    assert tag.split(".")[0].split("-")[0] == major


def test_pg_stat_statements_is_set_up_by_its_parameters(cnpg: list[Resource]) -> None:
    parameters = cluster_of(cnpg)["spec"]["postgresql"]["parameters"]
    # any pg_stat_statements.* parameter makes the operator preload it and create the extension
    assert parameters["pg_stat_statements.track"] == "all"
    assert "shared_preload_libraries" not in parameters


def bootstrap_methods(cluster: dict[str, Any]) -> list[str]:
    return [m for m in ("initdb", "recovery", "pg_basebackup") if m in cluster["spec"]["bootstrap"]]


def test_cluster_bootstraps_one_way(cnpg: list[Resource], from_compose: list[Resource]) -> None:
    assert bootstrap_methods(cluster_of(cnpg)) == ["initdb"]
    assert bootstrap_methods(cluster_of(from_compose)) == ["recovery"]


def test_recovery_reads_the_compose_folder_and_archives_to_its_own(
    from_compose: list[Resource],
) -> None:
    spec = cluster_of(from_compose)["spec"]
    recovery = spec["bootstrap"]["recovery"]
    # webhook: database and owner together; the source must be an external cluster with a plugin
    assert recovery["database"] == "dbops" and recovery["owner"] == "dbops"
    (source,) = [c for c in spec["externalClusters"] if c["name"] == recovery["source"]]
    assert source["plugin"]["name"] == PLUGIN
    stores = {s["metadata"]["name"] for s in find(from_compose, "ObjectStore")}
    assert source["plugin"]["parameters"]["barmanObjectName"] in stores
    assert source["plugin"]["parameters"]["serverName"] == COMPOSE_SERVER_NAME
    (archiver,) = [p for p in spec["plugins"] if p.get("isWALArchiver")]
    # a new cluster must never archive into the folder it recovers from
    assert archiver["parameters"]["serverName"] != COMPOSE_SERVER_NAME
    assert not problems(cluster_of(from_compose), "1.32")


def test_backups_go_through_the_plugin_to_the_object_store(cnpg: list[Resource]) -> None:
    cluster = cluster_of(cnpg)
    (plugin,) = cluster["spec"]["plugins"]
    assert plugin["name"] == PLUGIN and plugin["isWALArchiver"] is True
    assert plugin["parameters"]["barmanObjectName"] == "dbops-offsite"
    one(cnpg, "ObjectStore", plugin["parameters"]["barmanObjectName"])
    (scheduled,) = find(cnpg, "ScheduledBackup")
    assert scheduled["spec"]["cluster"]["name"] == cluster["metadata"]["name"]
    assert scheduled["spec"]["method"] == "plugin"
    assert scheduled["spec"]["pluginConfiguration"]["name"] == PLUGIN
    # CloudNativePG's schedules have six fields, seconds first
    assert len(scheduled["spec"]["schedule"].split()) == 6


def expected_roles(settings: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The roles `ops db init` creates, with the attributes and memberships db/roles.py gives."""
    loaded = load_settings({"DATABASE_URL": "postgresql://dbops@localhost/dbops", **settings}).seed
    kinds = {
        "app": (loaded.app_db_user, []),
        "monitor": (loaded.monitor_db_user, ["pg_monitor"]),
        "backup": (loaded.backup_db_user, ["pg_read_all_data", "pg_monitor"]),
    }
    roles = {}
    for kind, (name, groups) in kinds.items():
        spec = RoleSpec(kind=kind, name=name, password=None, env_prefix=kind.upper())
        roles[name] = {
            "login": True,
            "inherit": True,
            "superuser": False,
            "createrole": False,
            "replication": False,
            "bypassrls": False,
            "createdb": spec.createdb,
            "inRoles": groups,
            "passwordSecret": {"name": f"dbops-{kind}"},
        }
    return roles


def test_managed_roles_are_exactly_what_ops_db_init_makes(cnpg: list[Resource]) -> None:
    """Two reconcilers of one role must agree, or each undoes the other's work."""
    configmap = next(
        r for r in find(cnpg, "ConfigMap") if r["metadata"]["name"].startswith("dbops-settings-")
    )
    roles = cluster_of(cnpg)["spec"]["managed"]["roles"]
    names = [role["name"] for role in roles]
    # webhook: names unique and not reserved; connection limit -1 or >= 0
    assert len(names) == len(set(names))
    assert not RESERVED_ROLES & set(names)
    expected = expected_roles(configmap["data"])
    assert set(names) == set(expected)
    for role in roles:
        assert role["ensure"] == "present"
        assert role["connectionLimit"] == -1 or role["connectionLimit"] >= 0
        actual = {
            key: role.get(key, [] if key == "inRoles" else None) for key in expected[role["name"]]
        }
        assert actual == expected[role["name"]], role["name"]


def test_monitor_url_init_container_writes_a_url_the_settings_accept(
    rendered: dict[str, list[Resource]], tmp_path: Path
) -> None:
    """Run the init container's script for real, with a password full of URL syntax."""
    sidecar = one(rendered["standalone"], "Deployment", "dbops-sidecar")
    (init,) = sidecar["spec"]["template"]["spec"]["initContainers"]
    secret, run_dir = tmp_path / "secret", tmp_path / "run"
    secret.mkdir()
    run_dir.mkdir()
    password = "p@ss:w/o#r?d%20 é"
    (secret / "username").write_text("dbops_monitor\n")
    (secret / "password").write_text(password + "\n")
    script = (
        init["args"][0]
        .replace("/run/secrets/dbops-monitor", str(secret))
        .replace("/run/dbops", str(run_dir))
    )
    assert init["command"] == ["python", "-c"]
    env = {
        "PATH": os.environ["PATH"],
        "POSTGRES_HOST": "postgres",
        "POSTGRES_PORT": "5432",
        "POSTGRES_DB": "dbops",
    }
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=30)
    url_file = run_dir / "monitor-url"
    assert url_file.stat().st_mode & 0o777 == 0o600
    settings = load_settings(
        {
            "DATABASE_URL": "postgresql://x@localhost/dbops",
            "MONITOR_DATABASE_URL_FILE": str(url_file),
        }
    )
    url = settings.sidecar.monitor_url
    assert url is not None
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "dbops_monitor",
        password,
        "postgres",
        5432,
        "dbops",
    )
