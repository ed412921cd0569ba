"""The demo workload against a real PostgreSQL: claims, results, knowledge, saturation, signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.engine import URL, Engine

from db.engine import create_engine
from db.metrics import instrument
from db.settings import DbSettings
from ops.workload import ORIGIN, Workload, WorkloadSettings
from tests.conftest import env_for
from tests.pgcluster import free_port, wait_for

AGENTS = ("planner", "coder", "reviewer")


@pytest.fixture
def platform_db(migrated_db: URL) -> URL:
    """A database at head with three agents and one task that is not the workload's."""
    engine = create_engine(DbSettings(url=migrated_db, pool_size=1, max_overflow=0))
    with engine.begin() as connection:
        for name in AGENTS:
            connection.execute(
                text("INSERT INTO agents (name, role) VALUES (:name, :role)"),
                {"name": f"{name}-agent", "role": name},
            )
        connection.execute(
            text("INSERT INTO tasks (title, status) VALUES ('hand-made task', 'pending')")
        )
    engine.dispose()
    return migrated_db


@pytest.fixture
def make_engine() -> Iterator[object]:
    engines: list[Engine] = []

    def make(url: URL, pool_size: int, name: str = "workload-test") -> Engine:
        settings = DbSettings(
            url=url, pool_size=pool_size, max_overflow=0, pool_timeout=10, application_name=name
        )
        engine = create_engine(settings)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def scalar(engine: Engine, sql: str) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(sql)).scalar_one())


def test_agents_claim_each_task_once_and_record_results(platform_db: URL, make_engine) -> None:
    engine = make_engine(platform_db, pool_size=6)
    settings = WorkloadSettings(
        concurrency=6, hold_seconds=0.02, think_seconds=0.0, duration=2.5, queue_depth=20
    )
    stats = Workload(engine, settings).run()

    finished = stats.completed + stats.failed
    assert finished > 20, stats.summary()
    assert not stats.errors, stats.summary()
    workload_task = f"input->>'origin' = '{ORIGIN}'"
    # every claimed task was worked on exactly once, by an agent, and left finished or pending
    assert scalar(engine, f"SELECT count(*) FROM tasks WHERE {workload_task} AND attempts > 1") == 0
    assert (
        scalar(
            engine,
            f"SELECT count(*) FROM tasks WHERE {workload_task} "
            "AND status IN ('completed', 'failed')",
        )
        == finished
    )
    assert (
        scalar(
            engine,
            f"SELECT count(*) FROM tasks WHERE {workload_task} AND status = 'completed' "
            "AND (result IS NULL OR agent_id IS NULL OR completed_at IS NULL)",
        )
        == 0
    )
    assert (
        scalar(engine, f"SELECT count(*) FROM tasks WHERE {workload_task} AND status = 'running'")
        == 0
    )
    assert (
        scalar(engine, f"SELECT count(*) FROM metrics WHERE labels->>'origin' = '{ORIGIN}'")
        == finished
    )
    knowledge = scalar(
        engine, f"SELECT count(*) FROM knowledge_base WHERE external_id LIKE '{ORIGIN}:%'"
    )
    assert 0 < knowledge <= stats.knowledge_upserts
    # the task the workload did not create is left alone
    assert (
        scalar(
            engine,
            "SELECT count(*) FROM tasks WHERE title = 'hand-made task' AND status = 'pending'",
        )
        == 1
    )


def test_prune_keeps_only_the_newest_finished_workload_tasks(platform_db: URL, make_engine) -> None:
    engine = make_engine(platform_db, pool_size=4)
    settings = WorkloadSettings(
        concurrency=4, hold_seconds=0.0, think_seconds=0.0, duration=1.5, keep_finished=5
    )
    workload = Workload(engine, settings)
    stats = workload.run()
    assert stats.completed + stats.failed > 5, stats.summary()

    workload.prune()

    finished = "status IN ('completed', 'failed')"
    assert (
        scalar(
            engine, f"SELECT count(*) FROM tasks WHERE input->>'origin' = '{ORIGIN}' AND {finished}"
        )
        == 5
    )
    assert scalar(engine, "SELECT count(*) FROM tasks WHERE title = 'hand-made task'") == 1


def max_waiting_during(workload: Workload, registry: CollectorRegistry, pool: str) -> float:
    """Run the workload while sampling the exported ``dbops_pool_waiting`` gauge."""
    runner = threading.Thread(target=workload.run)
    runner.start()
    peak = 0.0
    while runner.is_alive():
        value = registry.get_sample_value("dbops_pool_waiting", {"pool": pool}) or 0.0
        peak = max(peak, value)
        time.sleep(0.05)
    runner.join()
    return peak


def test_saturate_mode_runs_the_pool_full_with_callers_waiting(
    platform_db: URL, make_engine
) -> None:
    engine = make_engine(platform_db, pool_size=2, name="saturated")
    registry = CollectorRegistry()
    instrument(engine, registry)
    settings = WorkloadSettings(
        mode="saturate", concurrency=6, hold_seconds=0.3, think_seconds=0.0, duration=2.5
    )
    workload = Workload(engine, settings)

    peak_waiting = max_waiting_during(workload, registry, "saturated")

    assert peak_waiting >= 1, workload.stats.summary()
    assert workload.stats.peak_checked_out == 2
    assert workload.stats.saturated_samples > 0


def test_steady_mode_within_the_pool_never_waits(platform_db: URL, make_engine) -> None:
    engine = make_engine(platform_db, pool_size=3, name="steady")
    registry = CollectorRegistry()
    instrument(engine, registry)
    settings = WorkloadSettings(concurrency=2, hold_seconds=0.05, think_seconds=0.05, duration=2.0)
    workload = Workload(engine, settings)

    peak_waiting = max_waiting_during(workload, registry, "steady")

    assert peak_waiting == 0
    assert workload.stats.completed > 0, workload.stats.summary()


def ops_workload(url: URL, **extra: str) -> subprocess.Popen[str]:
    env = env_for(url, **extra)
    return subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "workload"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_workload_command_serves_pool_metrics_and_stops_on_sigterm(platform_db: URL) -> None:
    port = free_port()
    process = ops_workload(
        platform_db,
        WORKLOAD_LISTEN=f"127.0.0.1:{port}",
        WORKLOAD_CONCURRENCY="2",
        WORKLOAD_THINK_SECONDS="0.05",
        DB_POOL_SIZE="2",
        DB_MAX_OVERFLOW="0",
        DB_APPLICATION_NAME="demo-workload",
    )
    try:

        def pool_exported() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                return False
            return 'dbops_pool_size{pool="demo-workload"} 2.0' in body and (
                'dbops_query_duration_seconds_count{operation="update",pool="demo-workload"}'
                in body
            )

        assert wait_for(pool_exported, timeout=30), "no pool metrics served"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "workload stopped" in output
    assert "completed=" in output


def test_workload_without_agents_exits_1_and_says_why(migrated_db: URL) -> None:
    process = ops_workload(migrated_db, WORKLOAD_LISTEN=f"127.0.0.1:{free_port()}")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1, output
    assert "no agents in the database" in output
