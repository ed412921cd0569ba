"""Security settings of every rendered pod: checkov (PyPI) on the rendered output, and our own
check of the settings the issue names, which needs nothing installed and says exactly what
failed. checkov lives in .venv-checkov (`make checkov`): it pins boto3 and packaging exactly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kubernetes.kube import ROOT, Resource, containers, kind_name, run, workloads

# Every check we skip, and why. Nothing else is skipped.
CHECKOV_SKIPS = {
    # Image should use a digest: the images are pinned by version tag (dbops by the project's
    # version, the others by the compose stack's); a digest differs per registry and mirror, so
    # it is the deployer's to set: `kustomize edit set image dbops=REGISTRY/dbops@sha256:...`.
    "CKV_K8S_43": "version tags; digests are per registry",
    # Image pull policy Always: with pinned tags IfNotPresent (the default) pulls what is
    # needed; Always would make every restart of PostgreSQL or the sidecar depend on the
    # registry being reachable.
    "CKV_K8S_15": "pinned tags; restarts must not need the registry",
}


def checkov() -> str:
    for candidate in (
        os.environ.get("CHECKOV"),
        str(ROOT / ".venv-checkov" / "bin" / "checkov"),
        shutil.which("checkov"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("checkov not found: run `make checkov` (creates .venv-checkov)")


def failed_checks(report: Any) -> list[tuple[str, str]]:
    reports = report if isinstance(report, list) else [report]
    return [
        (check["check_id"], check["resource"])
        for item in reports
        for check in item.get("results", {}).get("failed_checks", [])
    ]


def test_checkov_finds_nothing_but_the_explained_skips(
    overlay: str, rendered: dict[str, list[Resource]], tmp_path: Path
) -> None:
    (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(rendered[overlay]))
    result = run(
        [
            checkov(),
            "--directory",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--skip-check",
            ",".join(CHECKOV_SKIPS),
            "--skip-download",
            "--quiet",
            "--output",
            "json",
        ],
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "ERROR"},
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]
    report = json.loads(result.stdout)
    summaries = report if isinstance(report, list) else [report]
    assert sum(s["summary"]["passed"] for s in summaries) > 100, "checkov checked nothing"
    assert failed_checks(report) == [], failed_checks(report)


def test_checkov_would_catch_a_privileged_container(
    rendered: dict[str, list[Resource]], tmp_path: Path
) -> None:
    """The scan above is only worth having if a bad pod makes it fail."""
    resources = [
        json.loads(json.dumps(r)) for r in rendered["standalone"] if r["kind"] == "Deployment"
    ][:1]
    pod = resources[0]["spec"]["template"]["spec"]
    pod["containers"][0]["securityContext"]["privileged"] = True
    pod["hostPID"] = True
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump_all(resources))
    result = run(
        [
            checkov(),
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--quiet",
            "-o",
            "json",
        ],
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "ERROR"},
    )
    found = {check for check, _ in failed_checks(json.loads(result.stdout))}
    assert {"CKV_K8S_16", "CKV_K8S_17"} <= found, found


def pod_problems(resource: Resource, template: Resource) -> list[str]:
    spec = template["spec"]
    pod_context = spec.get("securityContext", {})
    found = []
    if spec.get("automountServiceAccountToken") is not False:
        found.append("mounts a service account token")
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            found.append(flag)
    if any("hostPath" in volume for volume in spec.get("volumes", [])):
        found.append("hostPath volume")
    if pod_context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        found.append("no RuntimeDefault seccomp profile")
    for container in containers(template):
        name = container["name"]
        context = container.get("securityContext", {})
        if not (context.get("runAsNonRoot") or pod_context.get("runAsNonRoot")):
            found.append(f"{name}: may run as root")
        uid = context.get("runAsUser", pod_context.get("runAsUser"))
        if uid is None or uid < 10000:
            found.append(f"{name}: UID {uid} (must be set and >= 10000)")
        if context.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: writable root filesystem")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: privilege escalation allowed")
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("capabilities", {}).get("drop") != ["ALL"]:
            found.append(f"{name}: capabilities not all dropped")
        if context.get("capabilities", {}).get("add"):
            found.append(f"{name}: adds capabilities")
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            for quantity in ("cpu", "memory"):
                if quantity not in resources.get(bound, {}):
                    found.append(f"{name}: no {quantity} {bound[:-1]}")
        for env in container.get("env", []):
            if "secretKeyRef" in env.get("valueFrom", {}):
                found.append(f"{name}: secret {env['name']} in the environment, not a file")
    return [f"{kind_name(resource)}: {problem}" for problem in found]


def test_every_pod_is_non_root_read_only_without_capabilities_and_bounded(
    overlay: str, rendered: dict[str, list[Resource]]
) -> None:
    problems = [
        problem
        for resource, template in workloads(rendered[overlay])
        for problem in pod_problems(resource, template)
    ]
    assert not problems, problems


def test_the_static_check_catches_each_weakness(rendered: dict[str, list[Resource]]) -> None:
    resource, template = next(workloads(rendered["standalone"]))
    assert not pod_problems(resource, template)
    weakenings = [
        lambda s, c: c["securityContext"].update(readOnlyRootFilesystem=False),
        lambda s, c: c["securityContext"].update(allowPrivilegeEscalation=True),
        lambda s, c: c["securityContext"].update(capabilities={"drop": ["NET_RAW"]}),
        lambda s, c: c["resources"].pop("limits"),
        lambda s, c: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        lambda s, c: s.update(hostNetwork=True),
        lambda s, c: s.update(automountServiceAccountToken=True),
        lambda s, c: s["securityContext"].update(runAsUser=0, runAsNonRoot=False),
    ]
    for weaken in weakenings:
        weak = json.loads(json.dumps(template))
        weaken(weak["spec"], weak["spec"]["containers"][0])
        assert pod_problems(resource, weak), weaken


def test_the_namespace_enforces_the_restricted_pod_security_standard(
    overlay: str, rendered: dict[str, list[Resource]]
) -> None:
    (namespace,) = [r for r in rendered[overlay] if r["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_no_secret_has_a_value_in_the_repository(
    overlay: str, rendered: dict[str, list[Resource]]
) -> None:
    assert not [kind_name(r) for r in rendered[overlay] if r["kind"] == "Secret"]
