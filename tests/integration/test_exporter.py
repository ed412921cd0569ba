"""The sidecar's exporter on real PostgreSQL, run as a role that has only ``pg_monitor``.

Every family is compared with ground truth read straight from the server.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Connection, Engine

from ops.collectors.activity import ActivityCollector
from ops.collectors.base import OTHER, Options
from ops.collectors.exporter import ExporterService, ServerExporter
from ops.settings import Settings, load_settings
from tests.conftest import Server


@pytest.fixture
def monitor_role(pg: Server) -> Iterator[tuple[str, str]]:
    name, password = f"mon_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    pg.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE pg_monitor")
    yield name, password
    pg.execute(f"DROP ROLE IF EXISTS {name}")


def sidecar_settings(url: URL, monitor: URL | None = None, **extra: str) -> Settings:
    env = {"DATABASE_URL": url.render_as_string(hide_password=False), **extra}
    if monitor is not None:
        env["MONITOR_DATABASE_URL"] = monitor.render_as_string(hide_password=False)
    return load_settings(env)


@pytest.fixture
def service(
    migrated_db: URL, monitor_role: tuple[str, str]
) -> Iterator[tuple[ExporterService, CollectorRegistry]]:
    user, password = monitor_role
    monitor = migrated_db.set(username=user, password=password)
    registry = CollectorRegistry()
    settings = sidecar_settings(migrated_db, monitor, OPS_TOP_N="3")
    exporter = ExporterService(settings, registry)
    yield exporter, registry
    exporter.stop()


@pytest.fixture
def admin(migrated_db: URL) -> Iterator[Engine]:
    engine = create_engine(migrated_db, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def scalar(engine: Engine, sql: str, **params: object) -> object:
    with engine.connect() as connection:
        return connection.execute(text(sql), params).scalar()


def test_exporter_runs_as_pg_monitor_role_and_every_collector_succeeds(
    service: tuple[ExporterService, CollectorRegistry],
    monitor_role: tuple[str, str],
    admin: Engine,
) -> None:
    exporter, registry = service
    exporter.exporter.refresh()
    generate_latest(registry)
    assert sample(registry, "dbops_pg_up") == 1
    for name in ("activity", "databases", "replication", "sizes", "indexes", "statements"):
        assert sample(registry, "dbops_collector_errors_total", collector=name) == 0, name
        assert sample(registry, "dbops_collector_last_success_timestamp_seconds", collector=name)
    with exporter.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT current_user").scalar() == monitor_role[0]
        # every exporter statement runs under these, set for the whole session
        assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "2s"
        assert connection.exec_driver_sql("SHOW lock_timeout").scalar() == "500ms"
    assert sample(registry, "dbops_pool_size", pool="dbops-sidecar") == 2
    assert sample(registry, "dbops_pool_max_overflow", pool="dbops-sidecar") == 0
    assert (sample(registry, "dbops_probe_duration_seconds_count") or 0) >= 1


def test_connection_counts_equal_pg_stat_activity(
    service: tuple[ExporterService, CollectorRegistry], migrated_db: URL, admin: Engine
) -> None:
    _, registry = service
    idle = create_engine(migrated_db, connect_args={"application_name": "gt-idle"})
    busy = create_engine(migrated_db, connect_args={"application_name": "gt-iit"})
    held: list[Connection] = []
    try:
        held += [idle.connect() for _ in range(3)]
        for connection in held:
            connection.exec_driver_sql("SELECT 1")
            connection.commit()
        for _ in range(2):
            connection = busy.connect()
            connection.exec_driver_sql("SELECT 1")  # leaves the transaction open
            held.append(connection)
        time.sleep(0.3)
        truth_sql = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app AND state = :state"
        )
        generate_latest(registry)
        database = migrated_db.database or ""
        assert (
            sample(
                registry,
                "dbops_pg_connections",
                datname=database,
                state="idle",
                application_name="gt-idle",
            )
            == scalar(admin, truth_sql, app="gt-idle", state="idle")
            == 3
        )
        assert (
            sample(
                registry,
                "dbops_pg_connections",
                datname=database,
                state="idle in transaction",
                application_name="gt-iit",
            )
            == scalar(admin, truth_sql, app="gt-iit", state="idle in transaction")
            == 2
        )
        iit_truth = scalar(
            admin, "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
        )
        assert sample(registry, "dbops_pg_idle_in_transaction_connections") == iit_truth
        longest = sample(registry, "dbops_pg_longest_transaction_seconds")
        assert longest is not None and 0.3 <= longest < 30
        total_truth = scalar(
            admin, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        )
        exported_total = sum(
            s.value
            for family in ActivityCollector().collect(admin.connect(), Options(top_n=50))[:1]
            for s in family.samples
        )
        assert exported_total == total_truth
    finally:
        for connection in held:
            connection.close()
        idle.dispose()
        busy.dispose()
    limits = dict(
        admin.connect()
        .exec_driver_sql(
            "SELECT name, setting::int FROM pg_settings WHERE name IN "
            "('max_connections', 'superuser_reserved_connections', 'reserved_connections')"
        )
        .all()
    )
    assert sample(registry, "dbops_pg_max_connections") == limits["max_connections"] == 300
    reserved = limits["superuser_reserved_connections"] + limits.get("reserved_connections", 0)
    assert sample(registry, "dbops_pg_reserved_connections") == reserved


def test_database_counters_follow_pg_stat_database_including_deadlocks(
    service: tuple[ExporterService, CollectorRegistry], migrated_db: URL, admin: Engine
) -> None:
    _, registry = service
    database = migrated_db.database or ""
    with admin.connect() as connection:
        connection.exec_driver_sql("CREATE TABLE dl (id int PRIMARY KEY, v int)")
        connection.exec_driver_sql("INSERT INTO dl VALUES (1, 0), (2, 0)")
    barrier = threading.Barrier(2)
    failures: list[str] = []
    engine = create_engine(migrated_db)

    def worker(first: int, second: int) -> None:
        try:
            with engine.begin() as connection:
                connection.execute(text("UPDATE dl SET v = v + 1 WHERE id = :i"), {"i": first})
                barrier.wait(5)
                connection.execute(text("UPDATE dl SET v = v + 1 WHERE id = :i"), {"i": second})
        except Exception as error:
            failures.append(type(error).__name__)

    threads = [threading.Thread(target=worker, args=pair) for pair in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    engine.dispose()  # backends exit and flush their statistics
    assert failures == ["OperationalError"]  # exactly one side was the deadlock victim
    stats_sql = (
        "SELECT xact_commit, xact_rollback, blks_hit, blks_read, deadlocks "
        "FROM pg_stat_database WHERE datname = :d"
    )
    time.sleep(0.5)
    with admin.connect() as connection:
        before = connection.execute(text(stats_sql), {"d": database}).one()
    generate_latest(registry)
    with admin.connect() as connection:
        after = connection.execute(text(stats_sql), {"d": database}).one()
    assert before.deadlocks == after.deadlocks == 1
    assert sample(registry, "dbops_pg_deadlocks_total", datname=database) == 1
    for column in ("xact_commit", "xact_rollback", "blks_hit", "blks_read"):
        value = sample(registry, f"dbops_pg_{column}_total", datname=database)
        assert value is not None
        assert getattr(before, column) <= value <= getattr(after, column), column


def test_database_size_is_within_one_percent_of_pg_database_size(
    service: tuple[ExporterService, CollectorRegistry], migrated_db: URL, admin: Engine
) -> None:
    exporter, registry = service
    exporter.exporter.refresh()
    truth = scalar(admin, "SELECT pg_database_size(current_database())")
    exported = sample(registry, "dbops_pg_database_size_bytes", datname=migrated_db.database or "")
    assert isinstance(truth, int) and exported is not None
    assert abs(exported - truth) <= truth * 0.01


def test_table_and_index_sizes_keep_top_n_and_sum_the_rest(
    service: tuple[ExporterService, CollectorRegistry], migrated_db: URL, admin: Engine
) -> None:
    exporter, registry = service
    with admin.connect() as connection:
        for number, rows in enumerate((20000, 8000, 3000, 500), start=1):
            connection.exec_driver_sql(f"CREATE TABLE big{number} (id int, pad text)")
            connection.exec_driver_sql(
                f"INSERT INTO big{number} SELECT g, repeat('x', 100) "
                f"FROM generate_series(1, {rows}) g"
            )
            connection.exec_driver_sql(f"CREATE INDEX big{number}_id ON big{number} (id)")
        tables = connection.exec_driver_sql(
            "SELECT c.relname, pg_table_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname = 'public' ORDER BY 2 DESC, 1"
        ).all()
        indexes = connection.exec_driver_sql(
            "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'i' AND n.nspname = 'public' ORDER BY 2 DESC, 1"
        ).all()
    exporter.exporter.refresh()
    database = migrated_db.database or ""
    for name, size in tables[:3]:
        labels = {"datname": database, "schema": "public", "table": name}
        assert sample(registry, "dbops_pg_table_size_bytes", **labels) == size
    assert [name for name, _ in tables[:3]] == ["big1", "big2", "big3"]
    other = {"datname": database, "schema": OTHER, "table": OTHER}
    assert sample(registry, "dbops_pg_table_size_bytes", **other) == sum(s for _, s in tables[3:])
    assert sample(registry, "dbops_pg_table_size_bytes", datname=database, schema="public",
                  table=tables[3][0]) is None  # fmt: skip
    for name, size in indexes[:3]:
        found = [
            s.value
            for family in registry.collect()
            if family.name == "dbops_pg_index_size_bytes"
            for s in family.samples
            if s.labels.get("index") == name
        ]
        assert found == [size], name
    other_index = {**other, "index": OTHER}
    assert sample(registry, "dbops_pg_index_size_bytes", **other_index) == sum(
        s for _, s in indexes[3:]
    )


def test_index_scans_and_unused_indexes_match_pg_stat_user_indexes(
    service: tuple[ExporterService, CollectorRegistry], migrated_db: URL, admin: Engine
) -> None:
    exporter, registry = service
    with admin.connect() as connection:
        connection.exec_driver_sql("CREATE TABLE scanned (id int, other int)")
        connection.exec_driver_sql("INSERT INTO scanned SELECT g, g FROM generate_series(1, 500) g")
        connection.exec_driver_sql("CREATE INDEX scanned_id ON scanned (id)")
        connection.exec_driver_sql("CREATE INDEX scanned_other_unused ON scanned (other)")
        connection.exec_driver_sql("ANALYZE scanned")
    scanner = create_engine(migrated_db)
    with scanner.connect() as connection:
        connection.exec_driver_sql("SET enable_seqscan = off")
        for value in range(7):
            connection.execute(text("SELECT * FROM scanned WHERE id = :v"), {"v": value})
    scanner.dispose()  # the backend exits and flushes its statistics
    time.sleep(0.5)
    exporter.exporter.refresh()
    database = migrated_db.database or ""
    truth = scalar(
        admin, "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'scanned_id'"
    )
    assert truth == 7
    labels = {"datname": database, "schema": "public", "table": "scanned", "index": "scanned_id"}
    assert sample(registry, "dbops_pg_index_scans_total", **labels) == 7
    unused_truth = scalar(
        admin,
        "SELECT count(*) FROM pg_stat_user_indexes s JOIN pg_index i USING (indexrelid) "
        "WHERE s.idx_scan = 0 AND NOT i.indisunique AND NOT i.indisprimary",
    )
    assert isinstance(unused_truth, int) and unused_truth >= 1
    assert sample(registry, "dbops_pg_unused_indexes", datname=database) == unused_truth


def test_statements_top_n_from_pg_stat_statements_when_installed(
    service: tuple[ExporterService, CollectorRegistry], migrated_db: URL, admin: Engine
) -> None:
    exporter, registry = service
    with admin.connect() as connection:
        connection.exec_driver_sql("CREATE EXTENSION pg_stat_statements")
        connection.exec_driver_sql("SELECT pg_stat_statements_reset()")
        for _ in range(25):
            connection.exec_driver_sql("SELECT count(*), pg_sleep(0.01) FROM pg_class")
    exporter.exporter.refresh()
    truth = (
        admin.connect()
        .execute(
            text(
                "SELECT queryid::text, sum(calls), sum(total_exec_time) / 1000 "
                "FROM pg_stat_statements WHERE query LIKE :q GROUP BY queryid"
            ),
            {"q": "SELECT count(*), pg_sleep%"},
        )
        .one()
    )
    assert sample(registry, "dbops_pg_stat_statements_enabled") == 1
    found = {
        s.name: s
        for family in registry.collect()
        if family.name.startswith("dbops_pg_statement_")
        for s in family.samples
        if s.labels["queryid"] == truth[0]
    }
    calls = found["dbops_pg_statement_calls_total"]
    assert calls.value == truth[1] == 25
    assert calls.labels["datname"] == migrated_db.database
    assert abs(found["dbops_pg_statement_seconds_total"].value - float(truth[2])) < 1e-6
    series = [
        s
        for family in registry.collect()
        if family.name == "dbops_pg_statement_calls"
        for s in family.samples
    ]
    assert len(series) <= 3 + 1  # top 3 and the remainder


def test_statements_are_absent_without_the_extension_and_that_is_no_error(
    service: tuple[ExporterService, CollectorRegistry],
) -> None:
    exporter, registry = service
    exporter.exporter.refresh()
    text_out = generate_latest(registry).decode()
    assert "dbops_pg_stat_statements_enabled 0.0" in text_out
    assert "dbops_pg_statement_calls_total{" not in text_out
    assert sample(registry, "dbops_collector_errors_total", collector="statements") == 0


def test_sizes_do_not_queue_behind_an_access_exclusive_lock(
    migrated_db: URL, monitor_role: tuple[str, str], admin: Engine
) -> None:
    user, password = monitor_role
    # A long lock_timeout: only the lock-avoiding queries can keep the refresh from blocking.
    settings = sidecar_settings(
        migrated_db,
        migrated_db.set(username=user, password=password),
        OPS_LOCK_TIMEOUT="60s",
        OPS_QUERY_TIMEOUT="60s",
    )
    registry = CollectorRegistry()
    exporter = ExporterService(settings, registry)
    with admin.connect() as connection:
        connection.exec_driver_sql("CREATE TABLE locked (id int PRIMARY KEY, pad text)")
        connection.exec_driver_sql(
            "INSERT INTO locked SELECT g, repeat('y', 200) FROM generate_series(1, 5000) g"
        )
        connection.exec_driver_sql("VACUUM ANALYZE locked")
    holder = create_engine(migrated_db).connect()
    try:
        holder.exec_driver_sql("LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        refresh = threading.Thread(target=exporter.exporter.refresh)
        refresh.start()
        refresh.join(10)
        assert not refresh.is_alive(), "the size refresh queued behind the lock"
        body = generate_latest(registry).decode()
        elapsed = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()
        refresh.join(30)
        exporter.stop()
    assert elapsed < 10
    assert sample(registry, "dbops_collector_errors_total", collector="sizes") == 0
    assert sample(registry, "dbops_collector_errors_total", collector="indexes") == 0
    series = f'datname="{migrated_db.database}",schema="public",table="locked"'
    line = f"dbops_pg_table_size_bytes{{{series}}}"
    assert line in body  # measured from pg_class.relpages while locked
    assert sample(registry, "dbops_pg_up") == 1


def test_one_failing_collector_is_counted_and_logged_once_while_others_report(
    migrated_db: URL, engine_for: Callable[..., Engine], caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        name = "broken"
        cached = False

        def collect(self, connection: Connection, options: Options) -> list[object]:
            connection.exec_driver_sql("SELECT * FROM no_such_relation")
            return []

    engine = engine_for(migrated_db, isolation_level="AUTOCOMMIT")
    exporter = ServerExporter(engine, collectors=[Broken(), ActivityCollector()])  # type: ignore[list-item]
    registry = CollectorRegistry()
    registry.register(exporter)
    with caplog.at_level(logging.WARNING, logger="ops.exporter"):
        for _ in range(3):
            body = generate_latest(registry).decode()
    assert sample(registry, "dbops_collector_errors_total", collector="broken") == 4
    assert sample(registry, "dbops_collector_errors_total", collector="activity") == 0
    assert "dbops_pg_connections{" in body
    assert sample(registry, "dbops_pg_up") == 1
    failures = [r for r in caplog.records if "collector broken failed" in r.getMessage()]
    assert len(failures) == 1
    assert "no_such_relation" in failures[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)


def test_a_real_scrape_passes_promtool_check_metrics(
    service: tuple[ExporterService, CollectorRegistry], admin: Engine
) -> None:
    exporter, registry = service
    with admin.connect() as connection:
        connection.exec_driver_sql("CREATE EXTENSION pg_stat_statements")
    exporter.exporter.refresh()
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install Debian's prometheus package"
    body = generate_latest(registry)
    assert b"dbops_pg_statement_calls_total{" in body and b"dbops_pool_size{" in body
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_concurrent_scrapes_of_a_slow_server_never_pile_up_connections(
    migrated_db: URL, admin: Engine
) -> None:
    class Slow:
        name = "slow"
        cached = False

        def collect(self, connection: Connection, options: Options) -> list[object]:
            connection.exec_driver_sql("SELECT pg_sleep(0.4)")
            return []

    settings = sidecar_settings(migrated_db, OPS_APPLICATION_NAME="pileup", OPS_QUERY_TIMEOUT="1s")
    from ops.collectors.exporter import exporter_engine

    engine = exporter_engine(settings)
    exporter = ServerExporter(engine, collectors=[Slow()], timeout=1.0)  # type: ignore[list-item]
    registry = CollectorRegistry()
    registry.register(exporter)
    durations: list[float] = []
    peak = [0]
    stop = threading.Event()

    def scrape() -> None:
        for _ in range(3):
            started = time.monotonic()
            generate_latest(registry)
            durations.append(time.monotonic() - started)

    def watch() -> None:
        while not stop.is_set():
            count = scalar(
                admin, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pileup'"
            )
            peak[0] = max(peak[0], int(count))  # type: ignore[call-overload]
            stop.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    scrapers = [threading.Thread(target=scrape) for _ in range(6)]
    try:
        for thread in scrapers:
            thread.start()
        for thread in scrapers:
            thread.join(60)
    finally:
        stop.set()
        watcher.join()
        engine.dispose()
    assert len(durations) == 18
    assert peak[0] == 1  # scrapes are serialized on one connection of the pool of 2
    assert max(durations) < exporter.deadline + exporter.timeout + 1, durations


def test_longest_transaction_leaves_out_the_sidecars_own_backup_sessions(
    service: tuple[ExporterService, CollectorRegistry], migrated_db: URL
) -> None:
    _, registry = service
    backup = create_engine(migrated_db, connect_args={"application_name": "dbops-backup"})
    client = create_engine(migrated_db, connect_args={"application_name": "gt-client"})
    try:
        with backup.connect() as dump:
            dump.exec_driver_sql("SELECT 1")  # the dump's transaction stays open
            time.sleep(1.5)
            generate_latest(registry)
            alone = sample(registry, "dbops_pg_longest_transaction_seconds")
            with client.connect() as other:
                other.exec_driver_sql("SELECT 1")
                time.sleep(0.3)
                generate_latest(registry)
                beside = sample(registry, "dbops_pg_longest_transaction_seconds")
    finally:
        backup.dispose()
        client.dispose()
    assert alone == 0.0
    assert beside is not None and 0.3 <= beside < 1.5
