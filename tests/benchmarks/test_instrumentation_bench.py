"""Cost of ``db.metrics.instrument``: a tight ``SELECT 1`` loop, instrumented vs plain.

Both engines are built the same way (db.engine.create_engine, one pooled connection) and run
in alternating rounds in the same process, so machine noise hits both alike. Prints figures;
asserts no time.
"""

from __future__ import annotations

import statistics
import time

from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.engine import Engine

from db.engine import create_engine
from db.metrics import instrument
from db.settings import load_db_settings
from tests.conftest import Server

ROUNDS = 12
LOOPS = 1500
STATEMENT = text("SELECT 1")


def _loop(engine: Engine, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        with engine.connect() as connection:
            connection.execute(STATEMENT).scalar()
    return time.perf_counter() - started


def test_instrumentation_overhead_on_select_1(pg: Server) -> None:
    url = pg.url("postgres").render_as_string(hide_password=False)
    settings = load_db_settings({"DATABASE_URL": url, "DB_POOL_SIZE": "1"})
    plain = create_engine(settings)
    instrumented = create_engine(settings)
    registry = CollectorRegistry()
    instrument(instrumented, registry)
    try:
        for engine in (plain, instrumented):
            _loop(engine, 300)  # warm up: connect, compile caches
        timings: dict[str, list[float]] = {"plain": [], "instrumented": []}
        for round_number in range(ROUNDS):
            order = [("plain", plain), ("instrumented", instrumented)]
            if round_number % 2:
                order.reverse()
            for name, engine in order:
                timings[name].append(_loop(engine, LOOPS))
    finally:
        plain.dispose()
        instrumented.dispose()

    counted = registry.get_sample_value(
        "dbops_query_duration_seconds_count", {"pool": "dbops", "operation": "select"}
    )
    plain_rate = LOOPS / statistics.median(timings["plain"])
    instrumented_rate = LOOPS / statistics.median(timings["instrumented"])
    loss = 1 - instrumented_rate / plain_rate
    best_loss = 1 - min(timings["plain"]) / min(timings["instrumented"])
    print()
    print("instrumentation overhead: checkout + SELECT 1 + checkin, 1 pooled connection")
    print(f"  rounds x loops          {ROUNDS} x {LOOPS} each, alternating")
    print(f"  plain                   {plain_rate:10.0f} statements/s (median round)")
    print(f"  instrumented            {instrumented_rate:10.0f} statements/s (median round)")
    print(f"  throughput loss         {loss * 100:9.2f} %  (target <= 3 %)")
    print(f"  loss, best rounds       {best_loss * 100:9.2f} %")
    print(f"  statements counted      {counted:10.0f}")
    assert counted is not None and counted >= ROUNDS * LOOPS + 300  # it saw every statement
