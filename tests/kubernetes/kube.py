"""Rendering the kustomize overlays and reading what they contain.

No cluster runs on our machines: every check of deploy/kubernetes is static, on the objects
`kubectl kustomize` (kustomize v5) renders. A missing kubectl or an older kustomize is a test
failure, not a skip: rendering is the first proof the manifests are whole.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("standalone", "cnpg-kube-prometheus")
SCHEMAS = Path(__file__).resolve().parent / "schemas"
MIN_KUSTOMIZE = (5, 0, 0)
# The Kubernetes versions README claims; both ends are validated.
KUBERNETES_VERSIONS = ("1.32", "1.36")

Resource = dict[str, Any]


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def kustomize_command() -> list[str]:
    """`kustomize build` when a kustomize binary is installed, else `kubectl kustomize`."""
    if path := shutil.which("kustomize"):
        return [path, "build"]
    if path := shutil.which("kubectl"):
        return [path, "kustomize"]
    pytest.fail("neither kustomize nor kubectl found: install kubectl >= 1.27 (kustomize v5)")


def kustomize_version() -> tuple[int, int, int]:
    command = kustomize_command()
    if command[1] == "build":
        result = run([command[0], "version"])
        text = result.stdout
    else:
        result = run([command[0], "version", "--client", "-o", "json"])
        text = json.loads(result.stdout or "{}").get("kustomizeVersion", "")
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", text)
    if result.returncode != 0 or not match:
        pytest.fail(f"cannot tell the kustomize version: {result.stdout}{result.stderr}")
    major, minor, patch = map(int, match.groups())
    return major, minor, patch


def render(directory: Path) -> list[Resource]:
    result = run([*kustomize_command(), str(directory)])
    assert result.returncode == 0, f"{directory.relative_to(ROOT)}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kind_name(resource: Resource) -> str:
    return f"{resource['kind']}/{resource['metadata']['name']}"


def find(resources: list[Resource], kind: str, name: str | None = None) -> list[Resource]:
    return [
        r
        for r in resources
        if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)
    ]


def one(resources: list[Resource], kind: str, name: str) -> Resource:
    found = find(resources, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


def pod_template(resource: Resource) -> Resource:
    spec = resource["spec"]
    if resource["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template: Resource = spec["template"]
    return template


def workloads(resources: list[Resource]) -> Iterator[tuple[Resource, Resource]]:
    """(workload, its pod template) for every object that runs pods."""
    for resource in resources:
        if resource["kind"] in WORKLOAD_KINDS:
            yield resource, pod_template(resource)


def containers(template: Resource) -> list[Resource]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())
