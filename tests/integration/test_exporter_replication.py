"""Server states the shared test cluster cannot show: a streaming standby, a missing preload.

Each test starts clusters of its own (the primary's settings differ or a standby is attached).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Engine

from ops.collectors.exporter import ServerExporter
from tests.pgcluster import Cluster, free_port, wait_for


def exporter_for(url: URL) -> tuple[ServerExporter, CollectorRegistry, Engine]:
    engine = create_engine(url, isolation_level="AUTOCOMMIT", pool_size=2, max_overflow=0)
    exporter = ServerExporter(engine, timeout=2.0)
    registry = CollectorRegistry()
    registry.register(exporter)
    return exporter, registry, engine


@pytest.fixture
def primary() -> Iterator[Cluster]:
    cluster = Cluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def standby(primary: Cluster) -> Iterator[URL]:
    """A streaming replica of ``primary``, made by pg_basebackup, on a port of its own."""
    datadir = primary.root / "standby"
    port = free_port()
    env = {**os.environ, "PGPASSWORD": primary.password}
    primary._run(
        [
            str(primary.bindir / "pg_basebackup"),
            *("-h", "127.0.0.1", "-p", str(primary.port), "-U", primary.superuser),
            *("-D", str(datadir), "-R", "-X", "stream", "--no-sync"),
        ],
        env=env,
    )
    options = " ".join(f"-c {k}={v}" for k, v in primary.settings.items())
    options += f" -p {port} -k {primary.socketdir}"
    log = primary.root / "standby.log"
    pg_ctl = str(primary.bindir / "pg_ctl")
    primary._run([pg_ctl, "-D", str(datadir), "-l", str(log), "-o", options, "-w", "start"])
    try:
        yield primary.url().set(port=port)
    finally:
        primary._run([pg_ctl, "-D", str(datadir), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(datadir, ignore_errors=True)


def test_replication_lag_is_zero_on_an_idle_primary_and_a_caught_up_standby(
    primary: Cluster, standby: URL
) -> None:
    _, primary_registry, primary_engine = exporter_for(primary.url())
    _, standby_registry, standby_engine = exporter_for(standby)
    try:

        def value(registry: CollectorRegistry, name: str) -> float | None:
            return registry.get_sample_value(name)

        assert wait_for(lambda: value(primary_registry, "dbops_pg_standbys") == 1, 20)
        assert value(primary_registry, "dbops_pg_in_recovery") == 0
        assert value(standby_registry, "dbops_pg_in_recovery") == 1
        with primary_engine.connect() as connection:
            connection.exec_driver_sql("CREATE TABLE replicated AS SELECT 1 AS x")

        def replicated() -> bool:
            with standby_engine.connect() as connection:
                found = connection.exec_driver_sql("SELECT to_regclass('replicated')").scalar()
            return found is not None

        assert wait_for(replicated, 20)
        time.sleep(1.5)  # idle: "seconds since the last replayed commit" would read > 1 by now
        # caught up, an idle standby reads 0
        assert value(standby_registry, "dbops_pg_replication_lag_seconds") == 0
        lag = value(primary_registry, "dbops_pg_replication_lag_seconds")
        assert lag is not None and 0 <= lag < 5
        for registry in (primary_registry, standby_registry):
            assert value(registry, "dbops_pg_up") == 1
            errors = [
                s.value
                for family in registry.collect()
                if family.name == "dbops_collector_errors"
                for s in family.samples
            ]
            assert errors and not any(errors)
    finally:
        primary_engine.dispose()
        standby_engine.dispose()


def test_idle_primary_without_standbys_reads_zero_lag(primary: Cluster) -> None:
    _, registry, engine = exporter_for(primary.url())
    try:
        body = generate_latest(registry).decode()
    finally:
        engine.dispose()
    assert "dbops_pg_replication_lag_seconds 0.0" in body
    assert "dbops_pg_standbys 0.0" in body


def test_statements_installed_but_not_preloaded_is_reported_absent_not_failed() -> None:
    cluster = Cluster({"shared_preload_libraries": "''"}).start()
    try:
        admin = create_engine(cluster.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql("CREATE EXTENSION pg_stat_statements")
        admin.dispose()
        exporter, registry, engine = exporter_for(cluster.url())
        exporter.refresh()
        body = generate_latest(registry).decode()
        engine.dispose()
    finally:
        cluster.stop()
    assert "dbops_pg_stat_statements_enabled 0.0" in body
    assert 'dbops_collector_errors_total{collector="statements"} 0.0' in body
    assert "dbops_pg_statement_calls_total{" not in body
