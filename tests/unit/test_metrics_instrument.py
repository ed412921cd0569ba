"""App-side metrics without a database: naming, classification, idempotence, exposition."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from db.metrics import (
    QUERY_BUCKETS,
    Histogram,
    classify,
    instrument,
    pool_name_of,
)

URL = "postgresql+psycopg2://u@127.0.0.1:1/x"


def test_classify_uses_first_keyword_case_insensitively() -> None:
    assert classify("SELECT 1") == "select"
    assert classify("\n  insert into t values (1)") == "insert"
    assert classify("( select 1) union (select 2)") == "select"
    assert classify("UPDATE t SET a = 1") == "update"
    assert classify("delete from t") == "delete"
    assert classify("WITH x AS (SELECT 1) SELECT * FROM x") == "select"
    assert (
        classify("with recursive t(n) as (select 1 union select n + 1 from t) select n") == "select"
    )
    assert (
        classify("WITH moved AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM moved")
        == "insert"
    )
    assert classify("WITH \"select\" AS (SELECT 'update') UPDATE t SET a = 1") == "update"
    assert classify("/* job 7 */ -- note\n  DELETE FROM t") == "delete"
    assert classify("SELECTED") == "other"
    assert classify("SELECT*FROM t") == "select"
    assert classify("BEGIN") == "other"
    assert classify("   ") == "other"


def test_histogram_counts_values_into_first_bucket_that_holds_them() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    counts, total = histogram.snapshot()
    assert counts == [2, 1, 1]
    assert abs(total - 3.65) < 1e-9


def test_query_buckets_resolve_the_100ms_target() -> None:
    assert 0.1 in QUERY_BUCKETS
    assert QUERY_BUCKETS[0] <= 0.001 and QUERY_BUCKETS[-1] >= 10


def test_pool_name_comes_from_connect_args_application_name() -> None:
    engine = create_engine(URL, connect_args={"application_name": "billing"})
    assert pool_name_of(engine) == "billing"
    engine = create_engine(URL + "?application_name=from-url")
    assert pool_name_of(engine) == "from-url"
    assert pool_name_of(create_engine(URL)) == "sqlalchemy"


def test_instrument_twice_is_harmless_and_exports_one_series_per_pool() -> None:
    registry = CollectorRegistry()
    engine = create_engine(
        URL, connect_args={"application_name": "svc"}, pool_size=3, max_overflow=4
    )
    first = instrument(engine, registry)
    assert instrument(engine, registry) is first
    text = generate_latest(registry).decode()
    assert text.count('dbops_pool_size{pool="svc"} 3.0') == 1
    assert 'dbops_pool_max_overflow{pool="svc"} 4.0' in text
    assert 'dbops_pool_waiting{pool="svc"} 0.0' in text
    assert 'dbops_pool_timeouts_total{pool="svc"} 0.0' in text
    assert 'dbops_query_duration_seconds_bucket{le="0.1",operation="select",pool="svc"}' in text
    assert 'dbops_query_errors_total{operation="update",pool="svc"} 0.0' in text
    engine.dispose()


def test_instrumented_pool_survives_dispose() -> None:
    registry = CollectorRegistry()
    engine = create_engine(URL, connect_args={"application_name": "d"}, pool_size=2)
    instrument(engine, registry)
    engine.dispose()
    assert type(engine.pool).__name__ == "InstrumentedQueuePool"
    assert hasattr(engine.pool._pool, "waiting")  # type: ignore[attr-defined]
    assert 'dbops_pool_size{pool="d"} 2.0' in generate_latest(registry).decode()


def test_engines_without_a_queue_pool_still_export_query_metrics() -> None:
    registry = CollectorRegistry()
    engine = create_engine(URL, poolclass=NullPool, connect_args={"application_name": "n"})
    instrument(engine, registry)
    text = generate_latest(registry).decode()
    assert 'dbops_pool_size{pool="n"}' not in text
    assert 'dbops_pool_connects_total{pool="n"} 0.0' in text


def test_wsgi_and_asgi_apps_serve_the_registry_without_a_socket() -> None:
    import asyncio

    from db.metrics import make_asgi_app, make_wsgi_app

    registry = CollectorRegistry()
    engine = create_engine(URL, connect_args={"application_name": "web"}, pool_size=5)
    instrument(engine, registry)
    statuses: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""}
    body = b"".join(make_wsgi_app(registry)(environ, lambda s, h: statuses.append(s)))
    assert statuses == ["200 OK"] and b'dbops_pool_size{pool="web"} 5.0' in body

    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/metrics", "query_string": b"",
             "headers": []}  # fmt: skip
    asyncio.run(make_asgi_app(registry)(scope, receive, send))
    assert sent[0]["status"] == 200
    assert b'dbops_pool_size{pool="web"} 5.0' in b"".join(
        m.get("body", b"")
        for m in sent[1:]  # type: ignore[misc]
    )
    engine.dispose()


def test_instrument_refuses_an_sqlalchemy_release_it_was_not_tested_on() -> None:
    import pytest

    from db.metrics import UnsupportedSQLAlchemy, check_sqlalchemy

    check_sqlalchemy("2.0.58")
    check_sqlalchemy("2.1.9")
    for version in ("2.2.0", "1.4.54", "3.0.0b1", "unknown"):
        with pytest.raises(UnsupportedSQLAlchemy) as caught:
            check_sqlalchemy(version)
        assert "supports SQLAlchemy 2.0.x, 2.1.x" in str(caught.value)
        assert version in str(caught.value)


def test_instrument_checks_every_internal_before_changing_the_engine() -> None:
    import pytest

    from db.metrics import UnsupportedSQLAlchemy

    engine = create_engine(URL)
    pool_class = type(engine.pool)
    del engine.pool._max_overflow  # as a release that renamed it would look

    with pytest.raises(UnsupportedSQLAlchemy, match="QueuePool has no _max_overflow"):
        instrument(engine, CollectorRegistry())

    assert type(engine.pool) is pool_class  # untouched: it still works, unmeasured
    assert "do_execute" not in vars(engine.dialect)


def test_pools_log_under_sqlalchemy_not_at_the_process_level() -> None:
    """A dispose logs at INFO; under ``sqlalchemy.`` that stays quiet by default."""
    from db.engine import create_engine as db_create_engine
    from db.settings import load_db_settings

    engine = db_create_engine(load_db_settings({"DATABASE_URL": URL}))
    instrument(engine, CollectorRegistry())
    assert engine.pool.logger.name.startswith("sqlalchemy.pool."), engine.pool.logger.name
    plain = create_engine(URL)
    instrument(plain, CollectorRegistry())
    for instrumented in (engine, plain):
        instrumented.dispose()  # the new pool is of the instrumented class
        name = instrumented.pool.logger.name
        assert name.startswith("sqlalchemy.pool.") and "Instrumented" not in name, name
