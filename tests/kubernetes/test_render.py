"""The overlays render with kustomize v5, and what is derived stays derived."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kubernetes.kube import (
    DEPLOY,
    MIN_KUSTOMIZE,
    OVERLAYS,
    ROOT,
    Resource,
    find,
    kustomize_version,
    one,
    render,
)


def test_kustomize_is_v5_or_newer() -> None:
    version = kustomize_version()
    assert version >= MIN_KUSTOMIZE, (
        f"kustomize {'.'.join(map(str, version))} is older than v5: the overlays use labels,"
        " components and replacements options of v5; install kubectl >= 1.27"
    )


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_overlay_renders_with_namespaced_objects(
    name: str, rendered: dict[str, list[Resource]]
) -> None:
    resources = rendered[name]
    assert resources
    for resource in resources:
        if resource["kind"] != "Namespace":
            assert resource["metadata"].get("namespace") == "dbops", resource["metadata"]
        assert resource["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dbops"


def test_generated_files_match_what_generate_py_makes_from_monitoring_now() -> None:
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def scratch_overlay() -> Iterator[Path]:
    """A throwaway overlay inside deploy/kubernetes (kustomize loads nothing from outside)."""
    path = DEPLOY / "overlays" / f".test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_generate_check_names_a_rule_file_that_changed(tmp_path: Path) -> None:
    """--check must fail when monitoring/ moves on and the generated files do not."""
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    shutil.copytree(ROOT / "monitoring", tmp_path / "monitoring")
    shutil.copytree(ROOT / "docker", tmp_path / "docker")
    rules = tmp_path / "monitoring" / "prometheus" / "rules" / "dbops-thresholds.yml"
    rules.write_text(rules.read_text().replace("1073741824", "2147483648"))
    script = tmp_path / "deploy" / "kubernetes" / "generate.py"
    check = [sys.executable, str(script), "--check"]
    result = subprocess.run(check, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "components/prometheus-operator/prometheusrule.yaml: out of date" in result.stderr
    assert "overlays/standalone/config/prometheus-rules/dbops-thresholds.yml" in result.stderr
    subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60, check=True)
    result = subprocess.run(check, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", OVERLAYS)
def test_init_job_name_follows_the_image_tag(name: str, scratch_overlay: Path) -> None:
    """A new image must create a new Job, or `ops db init` would not run for it."""
    source = (DEPLOY / "overlays" / name / "kustomization.yaml").read_text()
    for item in (DEPLOY / "overlays" / name).iterdir():
        if item.is_file() and item.name != "kustomization.yaml":
            shutil.copy(item, scratch_overlay / item.name)
    # the same overlay, one directory over, with another image
    text = source.replace(
        "images:\n  - name: dbops\n    newTag: 0.1.0",
        "images:\n  - name: dbops\n    newName: registry.example.org/team/dbops\n    newTag: 2.3.4",
    )
    assert text != source
    if name == "standalone":
        text = text.replace("  - config\n", "  - ../standalone/config\n")
    (scratch_overlay / "kustomization.yaml").write_text(text)
    resources = render(scratch_overlay)
    (job,) = find(resources, "Job")
    assert job["metadata"]["name"] == "dbops-init-2.3.4"
    images = {
        c["image"]
        for kind in ("Deployment", "Job")
        for r in find(resources, kind)
        for c in [*r["spec"]["template"]["spec"]["containers"]]
        if c["image"].endswith("dbops:2.3.4")
    }
    assert images == {"registry.example.org/team/dbops:2.3.4"}


def test_overlays_ship_the_projects_version_as_image_tag(
    rendered: dict[str, list[Resource]],
) -> None:
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, resources in rendered.items():
        job = find(resources, "Job")[0]
        assert job["metadata"]["name"] == f"dbops-init-{version}", name
        sidecar = one(resources, "Deployment", "dbops-sidecar")
        for container in sidecar["spec"]["template"]["spec"]["containers"]:
            assert container["image"] == f"dbops:{version}", name


def test_offsite_settings_reach_the_object_store_and_stay_out_of_the_output(
    rendered: dict[str, list[Resource]],
) -> None:
    resources = rendered["cnpg-kube-prometheus"]
    settings = dict(
        line.split("=", 1)
        for line in (DEPLOY / "overlays" / "cnpg-kube-prometheus" / "offsite.env")
        .read_text()
        .splitlines()
        if line and not line.startswith("#")
    )
    store = one(resources, "ObjectStore", "dbops-offsite")
    assert store["spec"]["configuration"]["destinationPath"] == settings["OFFSITE_S3_URL"]
    assert store["spec"]["retentionPolicy"] == settings["OFFSITE_RETENTION"]
    assert not find(resources, "ConfigMap", "dbops-offsite-settings")
