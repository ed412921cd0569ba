"""The compose stack for real: `make up` under a project name, env file and ports of its own.

Runs only under ``make e2e`` (``DBOPS_E2E=1``): it builds an image and starts containers, which
a plain ``pytest`` must not do by surprise. It never touches a user's stack: the project name,
the env file (in a temp dir), the image tag and every published port are the suite's own.
Prometheus gets short scrape/evaluation intervals (tests/e2e/compose.e2e.yml); the rules are
the real ones. When a test fails, every service's logs are saved and the tail is attached to
the failure report.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.pgcluster import free_port

ROOT = Path(__file__).resolve().parents[2]
# Every stack the suite starts has a project name with this prefix, and nothing else has.
PROJECT_PREFIX = "dbopse2e"
FIGURES: dict[str, str] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="end-to-end: run with `make e2e` (needs a Docker engine)")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.e2e)
            if os.environ.get("DBOPS_E2E") != "1":
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("stack figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


class Stack:
    """One throwaway stack and the ways the tests talk to it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.project = f"{PROJECT_PREFIX}{secrets.token_hex(3)}"
        self.ports = {
            name: free_port()
            for name in ("OPS_PORT", "PROMETHEUS_PORT", "ALERTMANAGER_PORT", "WORKLOAD_PORT")
        }
        self.env_file = workdir / "stack.env"
        # kept after the run (tmp/ is git-ignored), unlike pytest's rotating temp dirs
        self.log_dir = (
            Path(os.environ.get("E2E_LOG_DIR") or ROOT / "tmp" / "e2e-logs") / self.project
        )
        prometheus_config = workdir / "prometheus.yml"
        write_fast_prometheus_config(prometheus_config)
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.project,
            "STACK_ENV_FILE": str(self.env_file),
            "STACK_WITHOUT": "grafana",  # no image for it on machines without a registry
            "STACK_COMPOSE_FILES": "tests/e2e/compose.e2e.yml",
            "STACK_WAIT_TIMEOUT": "240",
            # The demo S3 server, so the stack ships off host and can be recovered from there
            # (test_stack_offsite.py); OFFSITE_* point at it.
            "COMPOSE_PROFILES": "objectstore",
            # a tag of its own, never the operator's dbops:local; kept afterwards as build cache
            # (E2E_DBOPS_IMAGE: another tag, so two checkouts' suites never rebuild each other's)
            "DBOPS_IMAGE": os.environ.get("E2E_DBOPS_IMAGE") or "dbops:e2e",
            "E2E_PROMETHEUS_CONFIG": str(prometheus_config),
            "GRAFANA_PORT": str(free_port()),
            **{name: str(port) for name, port in self.ports.items()},
        }
        for name in (
            "POSTGRES_PUBLISH_PORT",
            "WORKLOAD_MODE",
            "DATABASE_URL",
            "OFFSITE_S3_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ):
            self.env.pop(name, None)
        self.started = False
        self.demo_started = 0.0  # monotonic time `make demo` was typed
        self.volumes_before = set(volumes())

    # --- commands ----------------------------------------------------------------------------

    def make(
        self, target: str, timeout: float = 600, **variables: str
    ) -> subprocess.CompletedProcess[str]:
        """``make TARGET`` in the repository, as an operator types it, output captured."""
        env = {**self.env, **variables}
        return subprocess.run(
            ["make", "--no-print-directory", target],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stack(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["python3", "docker/stack.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def exec_ops(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", "ops", "ops", *args, timeout=timeout)

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The compose command exactly as docker/stack.py builds it for this stack."""
        command = stack_module().Stack(self.env).compose(*args, profile=True)
        return subprocess.run(
            command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def psql(self, sql: str, database: str | None = None) -> str:
        args = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-Atc", sql]
        if database:
            args[1:1] = ["-d", database]
        result = self.stack(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.strip()

    # --- state -------------------------------------------------------------------------------

    def containers(self) -> dict[str, dict[str, Any]]:
        """Every container of the project (one-offs too), by service name."""
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if not ids:
            return {}
        found = json.loads(
            subprocess.run(
                ["docker", "inspect", *ids], capture_output=True, text=True, check=True
            ).stdout
        )
        return {item["Config"]["Labels"]["com.docker.compose.service"]: item for item in found}

    def url(self, port_name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[port_name]}{path}"

    def get(self, port_name: str, path: str, timeout: float = 10) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(port_name, path), timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def get_json(self, port_name: str, path: str) -> Any:
        status, body = self.get(port_name, path)
        assert status == 200, f"{path}: HTTP {status}: {body[:500]}"
        return json.loads(body)

    def prometheus_query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get_json(
            "PROMETHEUS_PORT", "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        )
        return list(data["data"]["result"])

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        return self.prometheus_query(f'ALERTS{{alertname="{alertname}",alertstate="firing"}}')

    def alertmanager_alerts(self, alertname: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"filter": f'alertname="{alertname}"', "active": "true"})
        return list(self.get_json("ALERTMANAGER_PORT", f"/api/v2/alerts?{query}"))

    def save_logs(self) -> str:
        """Every service's full log into the log dir; returns the tail of each for the report."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        tails = []
        for service in self.containers():
            logs = self.compose("logs", "--no-color", service).stdout
            (self.log_dir / f"{service}.log").write_text(logs)
            tails.append(
                f"--- {service} (last 40 lines) ---\n" + "\n".join(logs.splitlines()[-40:])
            )
        states = self.stack("ps").stdout
        (self.log_dir / "ps.txt").write_text(states)
        return f"logs saved in {self.log_dir}\n{states}\n" + "\n".join(tails)

    def remove(self) -> None:
        """Everything the suite started: containers, volumes, network (the image stays)."""
        self.stack("down", "--volumes", timeout=180)


def volumes() -> dict[str, str]:
    """Every volume on the engine and the compose project it belongs to ("" for none)."""
    names = subprocess.run(
        ["docker", "volume", "ls", "-q"], capture_output=True, text=True, check=True
    ).stdout.split()
    if not names:
        return {}
    projects = subprocess.run(
        [
            "docker", "volume", "inspect", "--format",
            '{{index .Labels "com.docker.compose.project"}}', *names,
        ],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    return dict(zip(names, projects, strict=True))


def stack_module() -> Any:
    spec = importlib.util.spec_from_file_location("dbops_stack", ROOT / "docker" / "stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_fast_prometheus_config(path: Path) -> None:
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    config.setdefault("global", {}).update(
        {"scrape_interval": "2s", "evaluation_interval": "2s", "scrape_timeout": "2s"}
    )
    for job in config["scrape_configs"]:
        for discovery in job.get("dns_sd_configs", []):
            discovery["refresh_interval"] = "2s"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o644)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 2) -> Any:
    """``predicate()``'s first truthy value, or a failure naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, AssertionError, KeyError, ValueError) as error:
            last_error = error
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s (last error: {last_error})")
        time.sleep(interval)


def seconds_in(output: str, pattern: str) -> float | None:
    match = re.search(pattern, output)
    return float(match.group(1)) if match else None


def remove_leftovers() -> None:
    """Containers, volumes and networks of earlier runs killed before they could tear down."""
    label = "com.docker.compose.project"
    for kind, labels_field in (
        ("container", "Config.Labels"),
        ("volume", "Labels"),
        ("network", "Labels"),
    ):
        listed = ["docker", kind, "ls", "-q", "--filter", f"label={label}"]
        if kind == "container":
            listed.append("--all")
        items = subprocess.run(listed, capture_output=True, text=True, check=False).stdout.split()
        if not items:
            continue
        projects = subprocess.run(
            [
                "docker",
                kind,
                "inspect",
                "--format",
                f'{{{{index .{labels_field} "{label}"}}}}',
                *items,
            ],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.splitlines()
        stale = [
            item
            for item, project in zip(items, projects, strict=False)
            if project.startswith(PROJECT_PREFIX)
        ]
        if stale:
            force = ["-f"] if kind == "container" else []
            subprocess.run(["docker", kind, "rm", *force, *stale], capture_output=True, check=False)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if shutil.which("docker") is None:
        pytest.fail("make e2e needs Docker: the docker command is not installed")
    remove_leftovers()
    workdir = tmp_path_factory.mktemp("stack")
    workdir.chmod(0o755)
    the_stack = Stack(workdir)
    try:
        yield the_stack
    finally:
        the_stack.remove()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and call.when in ("setup", "call"):
        the_stack = item.funcargs.get("stack") if hasattr(item, "funcargs") else None
        if isinstance(the_stack, Stack):
            try:
                report.sections.append(("stack logs", the_stack.save_logs()))
            except Exception as error:  # the report must not hide the failure itself
                report.sections.append(("stack logs", f"could not collect logs: {error}"))
    return report
