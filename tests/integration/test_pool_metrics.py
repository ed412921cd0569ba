"""Pool and query metrics against a real pool on real PostgreSQL, driven past its limits."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import exc, text
from sqlalchemy.engine import URL, Connection, Engine

from db.metrics import instrument
from tests.pgcluster import wait_for

POOL = "pooltest"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def pool_engine(
    migrated_db: URL, engine_for: Callable[..., Engine], registry: CollectorRegistry
) -> Iterator[Engine]:
    engine = engine_for(
        migrated_db,
        pool_size=2,
        max_overflow=1,
        pool_timeout=1.0,
        connect_args={"application_name": POOL},
    )
    instrument(engine, registry)
    with engine.connect():
        pass  # the dialect's one-time initialization queries run (and are counted) here
    yield engine


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, {"pool": POOL, **labels})
    assert found is not None, f"{name} {labels} not exported"
    return found


def test_pool_gauges_waiters_and_timeouts_match_what_happened(
    pool_engine: Engine, registry: CollectorRegistry
) -> None:
    held: list[Connection] = [pool_engine.connect() for _ in range(3)]  # size 2 + overflow 1
    assert value(registry, "dbops_pool_size") == 2
    assert value(registry, "dbops_pool_max_overflow") == 1
    assert value(registry, "dbops_pool_checked_out") == 3
    assert value(registry, "dbops_pool_overflow") == 1
    assert value(registry, "dbops_pool_idle") == 0
    assert value(registry, "dbops_pool_waiting") == 0

    outcomes: list[str] = []
    release = threading.Event()

    def waiter() -> None:
        try:
            with pool_engine.connect() as connection:
                outcomes.append("got")
                connection.execute(text("SELECT 1"))
                release.wait(10)
        except exc.TimeoutError:
            outcomes.append("timeout")

    threads = [threading.Thread(target=waiter) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        assert wait_for(lambda: value(registry, "dbops_pool_waiting") == 2, 5)
        assert value(registry, "dbops_pool_checked_out") == 3

        threading.Event().wait(0.3)
        held.pop().close()  # one waiter gets this connection, the other times out after 1 s
        assert wait_for(lambda: outcomes.count("timeout") == 1, 5), outcomes
        assert outcomes.count("got") == 1
        assert value(registry, "dbops_pool_waiting") == 0
        assert value(registry, "dbops_pool_timeouts_total") == 1
        assert value(registry, "dbops_pool_checked_out") == 3
        # every checkout is timed, the one that timed out included: warm-up + 3 + 2
        assert value(registry, "dbops_pool_wait_seconds_count") == 6
        assert value(registry, "dbops_pool_wait_seconds_bucket", le="0.25") == 4  # no wait
        assert value(registry, "dbops_pool_wait_seconds_bucket", le="1.0") == 5  # ~0.3 s wait
        assert value(registry, "dbops_pool_wait_seconds_sum") > 1.0
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
        for connection in held:
            connection.close()
    assert value(registry, "dbops_pool_checked_out") == 0
    assert value(registry, "dbops_pool_overflow") == 0
    assert value(registry, "dbops_pool_idle") == 2  # the overflow connection was closed on return
    assert value(registry, "dbops_pool_connects_total") == 3


def test_concurrent_threads_past_the_limit_count_every_timeout(
    pool_engine: Engine, registry: CollectorRegistry
) -> None:
    results: list[str] = []
    lock = threading.Lock()
    peak = {"checked_out": 0.0, "waiting": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for key in peak:
                peak[key] = max(peak[key], value(registry, f"dbops_pool_{key}"))
            stop.wait(0.01)

    def worker() -> None:
        try:
            with pool_engine.connect() as connection:
                connection.execute(text("SELECT pg_sleep(0.6)"))
            outcome = "ok"
        except exc.TimeoutError:
            outcome = "timeout"
        with lock:
            results.append(outcome)

    selects_before = value(registry, "dbops_query_duration_seconds_count", operation="select")
    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = [threading.Thread(target=worker) for _ in range(8)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(30)
    stop.set()
    sampler.join()

    assert len(results) == 8
    # 3 connections, 0.6 s each, 1 s timeout: the first 3 finish, 3 more get in, 2 give up
    assert results.count("timeout") == value(registry, "dbops_pool_timeouts_total")
    assert results.count("timeout") >= 1
    assert peak["checked_out"] == 3
    assert peak["waiting"] >= 1
    assert value(registry, "dbops_pool_waiting") == 0
    assert value(registry, "dbops_pool_wait_seconds_count") == 8 + 1  # + the warm-up
    selects = value(registry, "dbops_query_duration_seconds_count", operation="select")
    assert selects - selects_before == results.count("ok")


def test_query_histogram_by_operation_and_error_counter(
    pool_engine: Engine, registry: CollectorRegistry
) -> None:
    def count(operation: str) -> float:
        return value(registry, "dbops_query_duration_seconds_count", operation=operation)

    before = {operation: count(operation) for operation in ("select", "insert", "other")}
    fast_before = value(
        registry, "dbops_query_duration_seconds_bucket", operation="select", le="0.1"
    )
    with pool_engine.begin() as connection:
        for _ in range(4):
            connection.execute(text("SELECT 1"))
        connection.execute(text("SELECT pg_sleep(0.12)"))
        connection.execute(text("CREATE TEMP TABLE t (a int)"))
        connection.execute(text("INSERT INTO t VALUES (1), (2)"))
        connection.execute(text("UPDATE t SET a = a + 1"))
        connection.execute(text("DELETE FROM t WHERE a = 2"))
    with pytest.raises(exc.ProgrammingError), pool_engine.connect() as connection:
        connection.execute(text("SELECT * FROM no_such_table"))

    assert count("select") - before["select"] == 5  # the failed one is counted as an error
    assert count("insert") == count("update") == count("delete") == 1
    assert count("other") - before["other"] == 1  # CREATE TEMP TABLE
    fast = value(registry, "dbops_query_duration_seconds_bucket", operation="select", le="0.1")
    assert fast - fast_before == 4  # pg_sleep(0.12) lands above the 100 ms bucket
    assert value(registry, "dbops_query_errors_total", operation="select") == 1
    assert value(registry, "dbops_query_errors_total", operation="insert") == 0


def test_invalidated_connections_are_counted_and_replaced(
    pool_engine: Engine, registry: CollectorRegistry
) -> None:
    with pool_engine.connect() as connection:
        connection.execute(text("SELECT 1"))
        connection.invalidate()
    with pool_engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    assert value(registry, "dbops_pool_invalidations_total") == 1
    assert value(registry, "dbops_pool_connects_total") == 2


def test_failed_connections_are_counted(
    pg: object, engine_for: Callable[..., Engine], registry: CollectorRegistry
) -> None:
    from tests.pgcluster import free_port

    bad = URL.create("postgresql+psycopg2", "nobody", "x", "127.0.0.1", free_port(), "none")
    engine = engine_for(bad, connect_args={"application_name": POOL, "connect_timeout": 2})
    instrument(engine, registry)
    with pytest.raises(exc.OperationalError):
        engine.connect()
    assert value(registry, "dbops_pool_connect_errors_total") == 1
    assert value(registry, "dbops_pool_checked_out") == 0


def test_metrics_server_serves_the_registry_and_shuts_down(
    pool_engine: Engine, registry: CollectorRegistry
) -> None:
    import urllib.request

    from db.metrics import start_metrics_server

    with pool_engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    server = start_metrics_server("127.0.0.1", 0, registry)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
    assert f'dbops_pool_connects_total{{pool="{POOL}"}} 1.0' in body
    assert f'dbops_query_duration_seconds_count{{operation="select",pool="{POOL}"}}' in body
    assert f'dbops_query_errors_total{{operation="select",pool="{POOL}"}} 0.0' in body
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
