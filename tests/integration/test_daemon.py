"""``ops serve`` as a real process: endpoints, the alert webhook, outage and recovery, signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import URL

from db.migrate import upgrade
from tests.conftest import env_for
from tests.pgcluster import Cluster, free_port, wait_for

OPS = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "ops")
ALERTS_TOKEN = "integration-test-webhook-token"


@dataclass
class Sidecar:
    process: subprocess.Popen[str]
    base: str
    log: Path

    def get(self, path: str, timeout: float = 10) -> tuple[int | None, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return None, ""

    def post(self, path: str, body: bytes, token: str = ALERTS_TOKEN) -> tuple[int, str]:
        request = urllib.request.Request(
            self.base + path,
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def metric(self, name: str) -> float | None:
        status, body = self.get("/metrics")
        if status != 200:
            return None
        for line in body.splitlines():
            if line.split(" ")[0] == name:
                return float(line.split(" ")[1])
        return None

    def stderr(self) -> str:
        return self.log.read_text()


@contextmanager
def sidecar(url: URL, **extra: str) -> Iterator[Sidecar]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dbops-sidecar-") as tmp:
        env = env_for(
            url,
            OPS_LISTEN=f"127.0.0.1:{port}",
            OPS_QUERY_TIMEOUT="1s",
            BACKUP_DIR=str(Path(tmp) / "backups"),
            OPS_ALERTS_TOKEN=ALERTS_TOKEN,
            **extra,
        )
        log = Path(tmp) / "stderr.log"
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [OPS, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True
            )
        running = Sidecar(process, f"http://127.0.0.1:{port}", log)
        try:
            assert wait_for(lambda: running.get("/healthz")[0] is not None, 30), running.stderr()
            yield running
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def stop(process: subprocess.Popen[str], signum: int = signal.SIGTERM) -> int:
    process.send_signal(signum)
    return process.wait(20)


def test_endpoints_and_sigterm_shutdown(migrated_db: URL) -> None:
    with sidecar(migrated_db) as running:
        assert wait_for(lambda: running.metric("dbops_pg_up") == 1, 15)
        status, body = running.get("/healthz")
        assert status == 200 and json.loads(body) == {"healthy": True, "problems": []}
        status, body = running.get("/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        status, body = running.get("/metrics")
        assert 'dbops_pool_size{pool="dbops-sidecar"} 2.0' in body
        assert 'dbops_pool_checked_out{pool="dbops-sidecar-ready"}' in body
        assert running.get("/nope")[0] == 404
        promtool = shutil.which("promtool")
        assert promtool, "promtool not found: install Debian's prometheus package"
        check = subprocess.run(
            [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert stop(running.process) == 0
        log = running.stderr()
        assert "stopping on SIGTERM" in log and "stopped" in log
        assert "Traceback" not in log
        assert running.get("/healthz", timeout=2)[0] is None  # the port is closed


def test_sigint_also_stops_cleanly(migrated_db: URL) -> None:
    with sidecar(migrated_db) as running:
        assert stop(running.process, signal.SIGINT) == 0
        assert "stopping on SIGINT" in running.stderr()


def test_alertmanager_webhook_is_logged_and_counted(migrated_db: URL) -> None:
    payload = {
        "version": "4",
        "status": "firing",
        "receiver": "ops",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "DbopsPostgresDown", "severity": "critical"},
                "annotations": {"summary": "PostgreSQL is down"},
            },
            {
                "status": "resolved",
                "labels": {"alertname": "DbopsDeadlocks", "severity": "warning"},
                "annotations": {"summary": "deadlocks detected"},
            },
        ],
    }
    with sidecar(migrated_db) as running:
        status, body = running.post("/alerts", json.dumps(payload).encode())
        assert status == 200 and json.loads(body) == {"received": 2}
        assert running.post("/alerts", b"{not json")[0] == 400
        assert running.get("/alerts")[0] == 405
        name = 'dbops_alerts_received_total{alertname="DbopsPostgresDown",status="firing"}'
        assert running.metric(name) == 1
        resolved = 'dbops_alerts_received_total{alertname="DbopsDeadlocks",status="resolved"}'
        assert running.metric(resolved) == 1
        stop(running.process)
        log = running.stderr()
    assert "alert firing DbopsPostgresDown severity=critical: PostgreSQL is down" in log
    assert "alert resolved DbopsDeadlocks severity=warning: deadlocks detected" in log


def test_readyz_fails_until_the_schema_is_at_head(empty_db: URL) -> None:
    with sidecar(empty_db) as running:
        status, body = running.get("/readyz")
        assert status == 503
        assert "no revision" in json.loads(body)["problems"][0]
        assert running.get("/healthz")[0] == 200
        engine = create_engine(empty_db)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        assert running.get("/readyz")[0] == 200
        stop(running.process)


def test_invalid_configuration_exits_2_before_listening(migrated_db: URL) -> None:
    env = env_for(migrated_db, OPS_LISTEN="nowhere", OPS_QUERY_TIMEOUT="soon")
    result = subprocess.run([OPS, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "OPS_LISTEN nowhere:" in result.stderr
    assert "OPS_QUERY_TIMEOUT soon:" in result.stderr


def test_a_taken_port_fails_with_exit_1(migrated_db: URL) -> None:
    with sidecar(migrated_db) as first:
        port = first.base.rsplit(":", 1)[1]
        env = env_for(migrated_db, OPS_LISTEN=f"127.0.0.1:{port}", BACKUP_DIR=tempfile.gettempdir())
        result = subprocess.run([OPS, "serve"], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert "cannot listen on 127.0.0.1:" in result.stderr
        stop(first.process)


@contextmanager
def migrated_cluster() -> Iterator[Cluster]:
    """A cluster of a test's own with its database at the head revision, stopped at the end:
    for tests that do to the server what others must not see."""
    cluster = Cluster().start()
    try:
        engine = create_engine(cluster.url())
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A cluster of this test's own: it is stopped and started again, which others must not see."""
    with migrated_cluster() as cluster:
        yield cluster


def test_outage_reports_down_fast_and_recovers_by_itself(own_cluster: Cluster) -> None:
    with sidecar(own_cluster.url(), OPS_COLLECTOR_TTL="2s") as running:
        assert wait_for(lambda: running.metric("dbops_pg_up") == 1, 15)
        assert running.get("/readyz")[0] == 200

        own_cluster.stop_server()
        durations = []
        for _ in range(5):
            started = time.monotonic()
            assert running.metric("dbops_pg_up") == 0
            durations.append(time.monotonic() - started)
        assert max(durations) < 5, durations  # answered, not hung on the dead server
        assert running.get("/readyz")[0] == 503
        assert running.get("/healthz")[0] == 200
        time.sleep(2.5)  # a refresh job runs against the dead server too

        own_cluster.start_server()
        assert wait_for(lambda: running.metric("dbops_pg_up") == 1, 20), running.stderr()
        assert wait_for(lambda: running.get("/readyz")[0] == 200, 20)
        errors = running.get("/metrics")[1]
        assert 'dbops_collector_errors_total{collector="activity"} 0.0' in errors
        assert stop(running.process) == 0
        log = running.stderr()
    assert 1 <= log.count("database unreachable") <= 2, log  # logged on change, not per scrape
    assert log.count("database reachable again") >= 1
    assert "Traceback" not in log
    assert os.path.exists(own_cluster.datadir)


def test_starts_and_stays_live_while_the_database_is_unreachable() -> None:
    nowhere = URL.create("postgresql+psycopg2", "dbops", "secret-pw", "127.0.0.1", free_port(), "x")
    with sidecar(nowhere) as running:
        started = time.monotonic()
        assert running.metric("dbops_pg_up") == 0
        assert time.monotonic() - started < 5
        assert running.get("/healthz")[0] == 200
        status, body = running.get("/readyz")
        assert status == 503 and "database unreachable" in body
        assert stop(running.process) == 0
        log = running.stderr()
    assert "secret-pw" not in log and "Traceback" not in log
    assert log.count("database unreachable") == 1


def test_a_component_that_cannot_start_stops_the_daemon_with_exit_1(
    migrated_db: URL, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import CollectorRegistry

    from ops.daemon import Daemon
    from ops.settings import load_settings

    class Broken:
        name = "broken"
        stopped = False

        def start(self, scheduler: object) -> None:
            raise RuntimeError("BACKUP_DIR is not writable")

        def health_problems(self) -> list[str]:
            return []

        def stop(self) -> None:
            Broken.stopped = True

    port = free_port()
    env = env_for(migrated_db, OPS_LISTEN=f"127.0.0.1:{port}")
    handler = signal.getsignal(signal.SIGTERM)
    daemon = Daemon(load_settings(env), CollectorRegistry(), components=[Broken()])  # type: ignore[list-item]
    assert daemon.run() == 1
    assert Broken.stopped and not daemon.scheduler.running
    assert "starting broken failed: BACKUP_DIR is not writable" in caplog.text
    assert signal.getsignal(signal.SIGTERM) == handler  # the caller's handlers are restored
