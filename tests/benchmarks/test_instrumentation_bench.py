"""Cost of ``db.metrics.instrument``: a tight ``SELECT 1`` loop, instrumented vs plain.

Both engines are built the same way (db.engine.create_engine, one pooled connection) and run
in many short rounds, alternating, in the same process; each instrumented round is compared with
the plain round next to it, and the median of those paired ratios is reported, so load from
other processes hits both sides alike. Both pools hand out the same database connection: with
two server backends, which core each backend lands on relative to the client moved the result
by about 10 % either way, more than the instrumentation costs. The client CPU per statement
(process time) is printed too: it is what instrumentation adds to. Prints figures; asserts no
time.
"""

from __future__ import annotations

import statistics
import time

import psycopg2
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.engine import Engine

from db.engine import create_engine
from db.metrics import instrument
from db.settings import load_db_settings
from tests.conftest import Server

ROUNDS = 200
LOOPS = 100
STATEMENT = text("SELECT 1")


def _loop(engine: Engine, count: int) -> tuple[float, float]:
    """Wall seconds and client CPU seconds for ``count`` checkouts of one ``SELECT 1`` each."""
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        with engine.connect() as connection:
            connection.execute(STATEMENT).scalar()
    return time.perf_counter() - started, time.process_time() - cpu


def test_instrumentation_overhead_on_select_1(pg: Server) -> None:
    url = pg.url("postgres").render_as_string(hide_password=False)
    settings = load_db_settings({"DATABASE_URL": url, "DB_POOL_SIZE": "1"})
    shared = psycopg2.connect(
        url.replace("postgresql+psycopg2://", "postgresql://"), application_name="dbops"
    )
    plain = create_engine(settings, creator=lambda: shared)
    instrumented = create_engine(settings, creator=lambda: shared)
    registry = CollectorRegistry()
    instrument(instrumented, registry, pool_name="dbops")
    try:
        for engine in (plain, instrumented):
            _loop(engine, 300)  # warm up: connect, compile caches
        timings: dict[str, list[tuple[float, float]]] = {"plain": [], "instrumented": []}
        for round_number in range(ROUNDS):
            order = [("plain", plain), ("instrumented", instrumented)]
            if round_number % 2:
                order.reverse()
            for name, engine in order:
                timings[name].append(_loop(engine, LOOPS))
    finally:
        plain.dispose()
        instrumented.dispose()
        shared.close()

    counted = registry.get_sample_value(
        "dbops_query_duration_seconds_count", {"pool": "dbops", "operation": "select"}
    )
    walls = {name: [wall for wall, _ in rounds] for name, rounds in timings.items()}
    cpus = {name: [cpu for _, cpu in rounds] for name, rounds in timings.items()}
    paired = [i / p for i, p in zip(walls["instrumented"], walls["plain"], strict=True)]
    loss = 1 - 1 / statistics.median(paired)
    plain_rate = LOOPS / statistics.median(walls["plain"])
    instrumented_rate = LOOPS / statistics.median(walls["instrumented"])
    plain_cpu = statistics.median(cpus["plain"]) / LOOPS * 1e6
    instrumented_cpu = statistics.median(cpus["instrumented"]) / LOOPS * 1e6
    print()
    print("instrumentation overhead: checkout + SELECT 1 + checkin, 1 pooled connection")
    print(f"  rounds x loops            {ROUNDS} x {LOOPS} each, alternating")
    print(f"  plain                     {plain_rate:8.0f} statements/s (median round)")
    print(f"  instrumented              {instrumented_rate:8.0f} statements/s (median round)")
    print(
        f"  throughput loss           {loss * 100:8.2f} %  (median of paired rounds; target <= 3 %)"
    )
    print(f"  client CPU / statement    {plain_cpu:8.1f} us plain")
    print(f"                            {instrumented_cpu:8.1f} us instrumented")
    print(f"  statements counted        {counted:8.0f}")
    assert counted is not None and counted >= ROUNDS * LOOPS + 300  # it saw every statement
