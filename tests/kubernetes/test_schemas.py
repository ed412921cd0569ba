"""Every rendered object passes a strict schema: built-in kinds the Kubernetes OpenAPI schemas
of PyPI kubernetes-validate at the oldest and newest version we claim, custom resources the
schemas of their CRDs at the operator versions we claim (tests/kubernetes/schemas, made from the
upstream CRDs by extract.py). An unknown field, a wrong type or a kind no schema covers fails."""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.kubernetes.kube import KUBERNETES_VERSIONS, SCHEMAS, Resource, kind_name

# apiVersion/kind -> schema file; the versions are the operators' README claims.
CUSTOM = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_ServiceMonitor",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_v1_PodMonitor",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_v1_PrometheusRule",
    ("postgresql.cnpg.io/v1", "Cluster"): "postgresql.cnpg.io_v1_Cluster",
    ("postgresql.cnpg.io/v1", "ScheduledBackup"): "postgresql.cnpg.io_v1_ScheduledBackup",
    ("barmancloud.cnpg.io/v1", "ObjectStore"): "barmancloud.cnpg.io_v1_ObjectStore",
}
PINNED = {
    "monitoring.coreos.com": "prometheus-operator v0.93.0",
    "postgresql.cnpg.io": "cloudnative-pg v1.30.0",
    "barmancloud.cnpg.io": "plugin-barman-cloud v0.14.0",
}


@cache
def custom_validator(name: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def problems(resource: Resource, version: str) -> list[str]:
    """Why ``resource`` fails its schema at Kubernetes ``version``; empty when it passes."""
    key = (resource["apiVersion"], resource["kind"])
    if key in CUSTOM:
        validator = custom_validator(CUSTOM[key])
        return [
            f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator.iter_errors(resource)
        ]
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path))}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"no schema covers it: {error}"]
    return []


def test_the_claimed_kubernetes_versions_have_schemas() -> None:
    available = {
        kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()
    }
    assert set(KUBERNETES_VERSIONS) <= available, sorted(available)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_passes_its_strict_schema(
    overlay: str, rendered: dict[str, list[Resource]], version: str
) -> None:
    failures = {
        kind_name(resource): found
        for resource in rendered[overlay]
        if (found := problems(resource, version))
    }
    assert not failures, failures


def test_custom_resource_schemas_name_the_pinned_upstream_crds() -> None:
    for (api_version, _), name in CUSTOM.items():
        schema = json.loads((SCHEMAS / f"{name}.json").read_text())
        assert PINNED[api_version.split("/")[0]] in schema["$comment"], name
        assert "sha256:" in schema["$comment"]


def _first(resources: list[Resource], kind: str) -> Resource:
    return copy.deepcopy(next(r for r in resources if r["kind"] == kind))


def _mutations(resources: list[Resource]) -> list[tuple[str, Resource]]:
    cases: list[tuple[str, Resource]] = []
    deployment = _first(resources, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    cases.append(("misspelt field in a Deployment", deployment))
    service = _first(resources, "Service")
    service["spec"]["ports"][0]["port"] = "ninety"
    cases.append(("string port in a Service", service))
    unknown = {"apiVersion": "example.org/v1", "kind": "Widget", "metadata": {"name": "w"}}
    cases.append(("kind with no schema", unknown))
    return cases


def test_an_unknown_field_a_wrong_type_or_an_unknown_kind_fails(
    rendered: dict[str, list[Resource]],
) -> None:
    for case, resource in _mutations(rendered["standalone"]):
        for version in KUBERNETES_VERSIONS:
            assert problems(resource, version), (case, version)


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("Cluster", ("spec", "instancez"), 3),
        ("Cluster", ("spec", "instances"), "three"),
        ("Cluster", ("spec", "managed", "roles", 0, "passwordSecret", "key"), "password"),
        ("ScheduledBackup", ("spec", "method"), "barmanObjectStorage"),
        ("ObjectStore", ("spec", "configuration", "wal", "compression"), "zip"),
        ("ServiceMonitor", ("spec", "endpoints", 0, "prot"), "http"),
        ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "interval"), "15 seconds"),
        ("PrometheusRule", ("spec", "groups", 0, "rules", 0, "fore"), "5m"),
    ],
)
def test_custom_resource_schemas_reject_what_the_api_server_would(
    rendered: dict[str, list[Resource]], kind: str, path: tuple[Any, ...], value: Any
) -> None:
    resource = _first(rendered["cnpg-kube-prometheus"], kind)
    assert not problems(resource, KUBERNETES_VERSIONS[0])
    target: Any = resource
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    assert problems(resource, KUBERNETES_VERSIONS[0]), (kind, path)
