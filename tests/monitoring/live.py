"""A live monitoring stack on loopback: PostgreSQL, ``ops serve``, a loaded pool, Prometheus and
Alertmanager running this repository's configuration with its targets rewritten to local ports.

Grafana cannot run on the test machines, so dashboards are proven by running every panel query
against this Prometheus. Everything listens on free ports and is removed afterwards.
"""

from __future__ import annotations

import json
import random
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from tests.conftest import env_for
from tests.monitoring.tools import ALERTMANAGER_CONFIG, PROMETHEUS, RULES_DIR, tool
from tests.pgcluster import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
OPS = str(ROOT / ".venv" / "bin" / "ops")
APP_POOL = "dbops-live-app"


def http_get(url: str, timeout: float = 10) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return None, ""


class Process:
    """A child process whose output goes to a log file we can show when something fails."""

    def __init__(self, name: str, args: list[str], log_dir: Path, **kwargs: Any) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, text=True, **kwargs
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class Load:
    """Threads issuing selects, inserts, updates and deletes through one instrumented pool.

    Three workers share a pool of two plus one overflow, so checkouts sometimes wait; a short
    pause between statements keeps the load light on a shared machine.
    """

    def __init__(self, engine: Engine, workers: int = 3) -> None:
        self.engine = engine
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._work, args=(n,), daemon=True) for n in range(workers)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _work(self, worker: int) -> None:
        rng = random.Random(worker)
        while not self.stopping.is_set():
            try:
                with self.engine.begin() as connection:
                    key = rng.randint(1, 200)
                    connection.execute(
                        text("INSERT INTO live_load (k, v) VALUES (:k, :v)"),
                        {"k": key, "v": rng.random()},
                    )
                    connection.execute(
                        text("SELECT count(*) FROM live_load WHERE k = :k"), {"k": key}
                    )
                    connection.execute(
                        text("UPDATE live_load SET v = v + 1 WHERE k = :k"), {"k": key}
                    )
                    if rng.random() < 0.3:
                        connection.execute(text("DELETE FROM live_load WHERE k = :k"), {"k": key})
                    time.sleep(0.005)
            except PoolTimeoutError:
                pass  # contention is part of the load
            except Exception as error:  # the test reports it
                self.errors.append(error)
                return
            time.sleep(0.02)

    def force_pool_timeout(self) -> None:
        """Take connections until the pool is exhausted and a checkout times out, for real."""
        held = []
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                try:
                    held.append(self.engine.pool.connect())
                except PoolTimeoutError:
                    return
            raise AssertionError("the pool never timed out")
        finally:
            for connection in held:
                connection.close()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(10)


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        status, body = http_get(url, timeout=20)
        assert status == 200, f"{url}: {status} {body[:500]}"
        payload = json.loads(body)
        assert payload["status"] == "success", payload
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def query_range(self, expr: str, seconds: int = 20, step: int = 2) -> list[dict[str, Any]]:
        now = time.time()
        return list(
            self.api("query_range", query=expr, start=now - seconds, end=now, step=step)["result"]
        )

    def label_values(self, selector: str, label: str) -> list[str]:
        series = self.api("series", **{"match[]": selector, "start": time.time() - 120})
        return sorted({s[label] for s in series if label in s})


def prometheus_config(ports: dict[str, int], rules: Path) -> dict[str, Any]:
    """This repository's prometheus.yml with 1 s intervals and local targets."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    config["rule_files"] = [str(rules / "*.yml")]
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    config["alerting"]["alertmanagers"][0]["static_configs"] = [
        {"targets": [f"127.0.0.1:{ports['alertmanager']}"]}
    ]
    return config


def alertmanager_config(sidecar_port: int, token_file: Path) -> dict[str, Any]:
    """This repository's alertmanager.yml, posting to the local sidecar without long waits.

    Only the URL and the token file's path change: the webhook's ``http_config`` is the real one.
    """
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    routes = [config["route"], *config["route"].get("routes", [])]
    for route in routes:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"http://127.0.0.1:{sidecar_port}/alerts"
            hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    return config


class LiveStack:
    def __init__(self, url: URL, engine: Engine) -> None:
        self.url = url
        self.engine = engine
        self.dir = Path(tempfile.mkdtemp(prefix="dbops-live-"))
        self.processes: list[Process] = []
        self.ports = {
            "dbops-sidecar": free_port(),
            "dbops-app": free_port(),
            "prometheus": free_port(),
            "alertmanager": free_port(),
        }
        self.load = Load(engine)
        self.metrics_server: Any = None
        self.prometheus = Prometheus(f"http://127.0.0.1:{self.ports['prometheus']}")
        self.backup_env = env_for(url, BACKUP_DIR=str(self.dir / "backups"))

    def start(self) -> LiveStack:
        from prometheus_client import CollectorRegistry

        from db.metrics import instrument, start_metrics_server

        with self.engine.begin() as connection:
            connection.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
            connection.execute(text("CREATE TABLE live_load (k int NOT NULL, v float8)"))
            connection.execute(text("CREATE INDEX live_load_k ON live_load (k)"))
        self.run_ops("backup", "run")
        self.run_ops("backup", "verify", "--drill")

        registry = CollectorRegistry()
        instrument(self.engine, registry)
        self.metrics_server = start_metrics_server("127.0.0.1", self.ports["dbops-app"], registry)
        self.load.start()

        token_file = self.dir / "ops_alerts_token"
        token_file.write_text(secrets.token_urlsafe(24) + "\n")
        token_file.chmod(0o600)
        sidecar_env = {
            **self.backup_env,
            "OPS_ALERTS_TOKEN_FILE": str(token_file),
            "OPS_LISTEN": f"127.0.0.1:{self.ports['dbops-sidecar']}",
            "OPS_COLLECTOR_TTL": "1s",
            "OPS_QUERY_TIMEOUT": "2s",
        }
        sidecar = self.spawn("sidecar", [OPS, "serve"], env=sidecar_env)
        sidecar_url = f"http://127.0.0.1:{self.ports['dbops-sidecar']}"
        assert wait_for(lambda: http_get(f"{sidecar_url}/readyz")[0] == 200, 30), sidecar.output()

        rules = self.dir / "rules"
        shutil.copytree(RULES_DIR, rules)
        am_config = self.dir / "alertmanager.yml"
        am_config.write_text(
            yaml.safe_dump(alertmanager_config(self.ports["dbops-sidecar"], token_file))
        )
        alertmanager = self.spawn(
            "alertmanager",
            [
                tool("alertmanager", "prometheus-alertmanager"),
                f"--config.file={am_config}",
                f"--storage.path={self.dir / 'alertmanager'}",
                f"--web.listen-address=127.0.0.1:{self.ports['alertmanager']}",
                "--cluster.listen-address=",
            ],
        )
        am_url = f"http://127.0.0.1:{self.ports['alertmanager']}/-/ready"
        assert wait_for(lambda: http_get(am_url)[0] == 200, 30), alertmanager.output()

        config = self.dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(self.ports, rules)))
        prometheus = self.spawn(
            "prometheus",
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}",
                "--storage.tsdb.retention.time=1h",
            ],
        )
        ready = f"{self.prometheus.base}/-/ready"
        assert wait_for(lambda: http_get(ready)[0] == 200, 30), prometheus.output()
        # Let Prometheus see both targets (and the timeout counter at 0) before the timeout.
        scraped = f'dbops_pool_timeouts_total{{pool="{APP_POOL}"}} == 0 and on () dbops_pg_up == 1'
        assert wait_for(lambda: self.prometheus.query(scraped), 30, interval=0.5), self.logs()
        self.load.force_pool_timeout()
        return self

    def run_ops(self, *args: str) -> str:
        result = subprocess.run(
            [OPS, *args], env=self.backup_env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"ops {' '.join(args)}: {result.stdout}{result.stderr}"
        return result.stdout

    def spawn(self, name: str, args: list[str], **kwargs: Any) -> Process:
        process = Process(name, args, self.dir, **kwargs)
        self.processes.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.output()}" for p in self.processes)

    def stop(self) -> None:
        self.load.stop()
        for process in reversed(self.processes):
            process.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)
