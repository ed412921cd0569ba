"""Cross-references between the rendered objects: selectors find pods, ports line up with
probes and monitors, and every Secret, ConfigMap, volume claim and service account a pod uses
is either created by the overlay or one of the Secrets README tells the user to create."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.kubernetes.kube import (
    ROOT,
    Resource,
    containers,
    find,
    kind_name,
    matches,
    one,
    workloads,
)

# The Secrets the user creates (README, Kubernetes section), and the keys each must hold.
# basic-auth: CloudNativePG reads `username` and `password` (kubernetes.io/basic-auth).
USER_SECRETS: dict[str, dict[str, set[str]]] = {
    "standalone": {
        "dbops-superuser": {"password"},
        "dbops-app": {"username", "password"},
        "dbops-monitor": {"username", "password"},
        "dbops-backup": {"username", "password"},
        "dbops-admin": {"password"},
        "dbops-grafana": {"admin-user", "admin-password"},
        "dbops-alerts": {"ops_alerts_token"},
    },
    "cnpg-kube-prometheus": {
        "dbops-superuser": {"username", "password"},
        "dbops-app": {"username", "password"},
        "dbops-monitor": {"username", "password"},
        "dbops-backup": {"username", "password"},
        "dbops-admin": {"password"},
        "dbops-offsite": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    },
}


def _names(resources: list[Resource], kind: str) -> set[str]:
    return {r["metadata"]["name"] for r in find(resources, kind)}


def secret_key_uses(resources: list[Resource]) -> dict[str, set[str]]:
    """Secret name -> the keys read from it, by pods and by the operators' resources."""
    uses: dict[str, set[str]] = {}

    def use(name: str, *keys: str) -> None:
        uses.setdefault(name, set()).update(keys)

    for _, template in workloads(resources):
        spec = template["spec"]
        mounts: dict[str, str] = {}
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                use(volume["secret"]["secretName"])
                for item in volume["secret"].get("items", []):
                    use(volume["secret"]["secretName"], item["key"])
        for container in containers(template):
            for mount in container.get("volumeMounts", []):
                volume = next(
                    (v for v in spec.get("volumes", []) if v["name"] == mount["name"]), {}
                )
                if "secret" in volume:
                    mounts[mount["mountPath"]] = volume["secret"]["secretName"]
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    use(ref["name"], ref["key"])
                value = env.get("value", "")
                if env["name"].endswith("_FILE") or env["name"].endswith("__FILE"):
                    directory, _, key = value.rpartition("/")
                    if directory in mounts:
                        use(mounts[directory], key)
            for arg in [*container.get("args", []), *container.get("command", [])]:
                for directory, secret in mounts.items():
                    for key in re.findall(re.escape(directory) + r"/([\w-]+)", arg):
                        use(secret, key)
    for cluster in find(resources, "Cluster"):
        spec = cluster["spec"]
        if "superuserSecret" in spec:
            use(spec["superuserSecret"]["name"], "username", "password")
        for role in spec.get("managed", {}).get("roles", []):
            if "passwordSecret" in role:
                use(role["passwordSecret"]["name"], "username", "password")
    for store in find(resources, "ObjectStore"):
        for ref in store["spec"]["configuration"].get("s3Credentials", {}).values():
            use(ref["name"], ref["key"])
    return uses


def test_every_secret_used_is_one_the_user_creates_with_the_keys_readme_lists(
    overlay: str, rendered: dict[str, list[Resource]]
) -> None:
    uses = secret_key_uses(rendered[overlay])
    listed = USER_SECRETS[overlay]
    assert set(uses) == set(listed), "README's list and the manifests disagree"
    for name, keys in uses.items():
        assert keys <= listed[name], (name, keys - listed[name])
        assert keys, f"{name}: no key of it is read"


def test_the_monitor_url_is_built_from_both_keys_of_its_secret(
    rendered: dict[str, list[Resource]],
) -> None:
    uses = secret_key_uses(rendered["standalone"])
    assert uses["dbops-monitor"] == {"username", "password"}


def test_every_configmap_claim_and_service_account_a_pod_uses_exists(
    overlay: str, rendered: dict[str, list[Resource]]
) -> None:
    resources = rendered[overlay]
    configmaps = _names(resources, "ConfigMap")
    claims = _names(resources, "PersistentVolumeClaim")
    accounts = _names(resources, "ServiceAccount")
    missing = []
    for workload, template in workloads(resources):
        spec = template["spec"]
        claim_templates = {
            t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
        }
        if "serviceAccountName" in spec and spec["serviceAccountName"] not in accounts:
            missing.append(f"{kind_name(workload)}: service account {spec['serviceAccountName']}")
        for volume in spec.get("volumes", []):
            refs = [volume.get("configMap", {}).get("name")]
            refs += [
                s.get("configMap", {}).get("name")
                for s in volume.get("projected", {}).get("sources", [])
            ]
            missing += [
                f"{kind_name(workload)}: ConfigMap {r}" for r in refs if r and r not in configmaps
            ]
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in claims:
                missing.append(f"{kind_name(workload)}: claim {claim}")
        mounted = {m["name"] for c in containers(template) for m in c.get("volumeMounts", [])}
        declared = {v["name"] for v in spec.get("volumes", [])} | claim_templates
        missing += [f"{kind_name(workload)}: volume {m}" for m in mounted - declared]
        for container in containers(template):
            for source in container.get("envFrom", []):
                name = source.get("configMapRef", {}).get("name")
                if name and name not in configmaps:
                    missing.append(f"{kind_name(workload)}: ConfigMap {name}")
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref and ref["name"] not in configmaps:
                    missing.append(f"{kind_name(workload)}: ConfigMap {ref['name']}")
    assert not missing, missing


def pods_of(resources: list[Resource], selector: dict[str, str]) -> list[Resource]:
    return [t for _, t in workloads(resources) if matches(selector, t["metadata"]["labels"])]


def container_ports(template: Resource) -> dict[Any, int]:
    """Port name and number -> number, over every container of a pod."""
    ports: dict[Any, int] = {}
    for container in containers(template):
        for port in container.get("ports", []):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


def test_every_service_selects_pods_that_have_its_target_ports(
    overlay: str, rendered: dict[str, list[Resource]]
) -> None:
    resources = rendered[overlay]
    for service in find(resources, "Service"):
        pods = pods_of(resources, service["spec"]["selector"])
        assert len(pods) == 1, kind_name(service)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports(pods[0]), (kind_name(service), port)


def test_probes_use_ports_their_container_declares(
    overlay: str, rendered: dict[str, list[Resource]]
) -> None:
    for workload, template in workloads(rendered[overlay]):
        for container in containers(template):
            declared = {p.get("name") for p in container.get("ports", [])} | {
                p["containerPort"] for p in container.get("ports", [])
            }
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                http = container.get(probe, {}).get("httpGet")
                if http:
                    assert http["port"] in declared, (kind_name(workload), probe)


def test_sidecar_probes_are_healthz_and_readyz(
    overlay: str, rendered: dict[str, list[Resource]]
) -> None:
    sidecar = one(rendered[overlay], "Deployment", "dbops-sidecar")
    (ops,) = sidecar["spec"]["template"]["spec"]["containers"]
    assert ops["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ops["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ops["ports"][0]["containerPort"] == 9188
    env = {e["name"]: e.get("value") for e in ops["env"]}
    assert env["OPS_LISTEN"].endswith(":9188")


def test_service_monitor_finds_the_sidecar_service_port_and_job_name(
    rendered: dict[str, list[Resource]],
) -> None:
    resources = rendered["cnpg-kube-prometheus"]
    monitor = one(resources, "ServiceMonitor", "dbops-sidecar")
    services = [
        s
        for s in find(resources, "Service")
        if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in services] == ["ops"]
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
    # DbopsSidecarDown reads up{job="dbops-sidecar"}: the job comes from this Service label
    assert services[0]["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "dbops-sidecar"


def test_monitors_and_rules_carry_the_kube_prometheus_stack_release_label(
    rendered: dict[str, list[Resource]],
) -> None:
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        for resource in find(rendered["cnpg-kube-prometheus"], kind):
            assert resource["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# CloudNativePG's instance pods (cloudnative-pg v1.30.0, pkg/utils/labels_annotations.go and
# pkg/specs/pods.go): labels cnpg.io/cluster=<Cluster>, cnpg.io/podRole=instance; the
# exporter's container port is named "metrics".
CNPG_POD_LABELS = {"cnpg.io/cluster": "dbops-db", "cnpg.io/podRole": "instance"}


def test_cluster_pod_monitor_selects_the_clusters_instances(
    rendered: dict[str, list[Resource]],
) -> None:
    resources = rendered["cnpg-kube-prometheus"]
    cluster = one(resources, "Cluster", "dbops-db")
    monitor = one(resources, "PodMonitor", "dbops-db")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector["cnpg.io/cluster"] == cluster["metadata"]["name"]
    assert matches(selector, CNPG_POD_LABELS)
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    # the backup alerts group by the label this copies (cnpg.io/cluster -> cnpg_io_cluster)
    assert "cnpg.io/cluster" in monitor["spec"]["podTargetLabels"]


def test_network_policies_select_pods_and_admit_their_service_ports(
    overlay: str, rendered: dict[str, list[Resource]]
) -> None:
    resources = rendered[overlay]
    policies = find(resources, "NetworkPolicy")
    for _, template in workloads(resources):
        assert any(
            matches(p["spec"]["podSelector"]["matchLabels"], template["metadata"]["labels"])
            for p in policies
        ), template["metadata"]["labels"]
    for service in find(resources, "Service"):
        (pod,) = pods_of(resources, service["spec"]["selector"])
        ports = container_ports(pod)
        admitted = {
            port["port"]
            for policy in policies
            if matches(policy["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"])
            for rule in policy["spec"].get("ingress", [])
            for port in rule.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert ports[port["targetPort"]] in admitted, kind_name(service)


def test_standalone_prometheus_and_alertmanager_addresses_resolve_to_services(
    rendered: dict[str, list[Resource]],
) -> None:
    resources = rendered["standalone"]
    services = {
        (s["metadata"]["name"], p["port"])
        for s in find(resources, "Service")
        for p in s["spec"]["ports"]
    }
    config_map = next(
        r
        for r in find(resources, "ConfigMap")
        if r["metadata"]["name"].startswith("prometheus-config-")
    )
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    targets = [
        target
        for job in config["scrape_configs"]
        if job["job_name"] in ("dbops-sidecar", "alertmanager")
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    targets += [
        t
        for a in config["alerting"]["alertmanagers"]
        for s in a["static_configs"]
        for t in s["targets"]
    ]
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert (host, int(port)) in services, target
    alertmanager = next(
        r
        for r in find(resources, "ConfigMap")
        if r["metadata"]["name"].startswith("alertmanager-config-")
    )
    for url in re.findall(r"url: http://([\w-]+):(\d+)/", alertmanager["data"]["alertmanager.yml"]):
        assert (url[0], int(url[1])) in services, url
    datasources = next(
        r
        for r in find(resources, "ConfigMap")
        if r["metadata"]["name"].startswith("grafana-datasources-")
    )
    for url in re.findall(r"url: http://([\w-]+):(\d+)", datasources["data"]["prometheus.yml"]):
        assert (url[0], int(url[1])) in services, url


def settings(resources: list[Resource]) -> dict[str, str]:
    (configmap,) = [
        r
        for r in find(resources, "ConfigMap")
        if r["metadata"]["name"].startswith("dbops-settings-")
    ]
    data: dict[str, str] = configmap["data"]
    return data


def test_the_sidecar_reaches_postgresql_where_the_overlay_runs_it(
    rendered: dict[str, list[Resource]],
) -> None:
    standalone = settings(rendered["standalone"])
    service = one(rendered["standalone"], "Service", standalone["POSTGRES_HOST"])
    assert int(standalone["POSTGRES_PORT"]) in {p["port"] for p in service["spec"]["ports"]}
    cnpg = settings(rendered["cnpg-kube-prometheus"])
    cluster = one(rendered["cnpg-kube-prometheus"], "Cluster", "dbops-db")
    # CloudNativePG names the primary's read-write Service <cluster>-rw, on port 5432
    assert cnpg["POSTGRES_HOST"] == f"{cluster['metadata']['name']}-rw"
    assert cnpg["POSTGRES_PORT"] == "5432"
    assert cnpg["POSTGRES_DB"] == cluster["spec"]["bootstrap"]["initdb"]["database"]


@pytest.mark.parametrize("name", ["standalone", "cnpg-kube-prometheus"])
def test_init_job_logs_in_as_the_servers_superuser(
    name: str, rendered: dict[str, list[Resource]]
) -> None:
    resources = rendered[name]
    (job,) = find(resources, "Job")
    env = {
        e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    if name == "standalone":
        postgres = one(resources, "StatefulSet", "postgres")
        server_env = {
            e["name"]: e.get("value")
            for e in postgres["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env["POSTGRES_USER"] == server_env["POSTGRES_USER"]
        assert env["POSTGRES_PASSWORD_FILE"] == server_env["POSTGRES_PASSWORD_FILE"]
    else:
        cluster = one(resources, "Cluster", "dbops-db")
        assert cluster["spec"]["enableSuperuserAccess"] is True
        assert env["POSTGRES_USER"] == "postgres"
        assert env["POSTGRES_PASSWORD_FILE"].startswith(
            f"/run/secrets/{cluster['spec']['superuserSecret']['name']}/"
        )


def test_every_scrape_job_is_named_as_the_dashboards_expect(
    rendered: dict[str, list[Resource]],
) -> None:
    """The dashboards' instance variable lists up{job=~"dbops-.*"}."""
    resources = rendered["cnpg-kube-prometheus"]
    jobs = []
    for monitor in find(resources, "ServiceMonitor"):
        (service,) = [
            s
            for s in find(resources, "Service")
            if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        jobs.append(service["metadata"]["labels"][monitor["spec"]["jobLabel"]])
    for monitor in find(resources, "PodMonitor"):
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            (job,) = [
                r["replacement"] for r in endpoint["relabelings"] if r.get("targetLabel") == "job"
            ]
            jobs.append(job)
    assert sorted(jobs) == ["dbops-app", "dbops-postgres", "dbops-sidecar"]
    dashboards = (ROOT / "monitoring" / "grafana" / "dashboards").glob("*.json")
    assert all('job=~\\"dbops-.*\\"' in path.read_text() for path in dashboards)
