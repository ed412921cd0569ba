"""The sidecar's server-side exporter: one small pool, every query under a timeout.

A scrape probes the server (``SELECT 1``, timed into ``dbops_probe_duration_seconds``), runs the
cheap collectors on the same connection and serves the expensive ones from the cache that a
scheduler job refreshes every ``OPS_COLLECTOR_TTL``, so scrape time does not grow with the
number of tables. Each collector fails alone: its error is counted, logged once when it starts
(and once when it ends), and the others still report.

Bounded by construction: the pool has ``OPS_POOL_SIZE`` connections and no overflow, scrapes
are serialized, and a scrape that cannot get the scrape lock within the query timeout (the
previous one is stuck on a frozen server) answers ``dbops_pg_up 0`` at once instead of piling
up. Every statement runs under the session's ``statement_timeout`` and ``lock_timeout``, set in
the connection's startup packet so they cost no round trip.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from apscheduler.schedulers.base import BaseScheduler
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector as RegistryCollector
from sqlalchemy import exc
from sqlalchemy.engine import Connection, Engine

from db.engine import create_engine
from db.errors import error_line
from db.metrics import Histogram, instrument
from db.redact import redact_url
from ops.collectors.activity import ActivityCollector
from ops.collectors.base import Collector, Options
from ops.collectors.databases import DatabaseStatsCollector
from ops.collectors.indexes import IndexUsageCollector
from ops.collectors.replication import ReplicationCollector
from ops.collectors.sizes import SizesCollector
from ops.collectors.statements import StatementsCollector
from ops.settings import Settings

log = logging.getLogger("ops.exporter")

PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REFRESH_JOB = "exporter-refresh"


def default_collectors(disabled: Sequence[str] = ()) -> list[Collector]:
    """Every collector but the ``disabled`` ones (names from ``COLLECTOR_NAMES``)."""
    collectors: list[Collector] = [
        ActivityCollector(),
        DatabaseStatsCollector(),
        ReplicationCollector(),
        SizesCollector(),
        IndexUsageCollector(),
        StatementsCollector(),
    ]
    return [collector for collector in collectors if collector.name not in disabled]


def exporter_engine(settings: Settings) -> Engine:
    """The exporter's pool: MONITOR_DATABASE_URL if set, OPS_POOL_SIZE connections, no overflow."""
    sidecar = settings.sidecar
    db = settings.db
    if sidecar.monitor_url is not None:
        db = replace(db, url=sidecar.monitor_url)
    options = " ".join(
        [
            f"-c statement_timeout={max(1, int(sidecar.query_timeout * 1000))}",
            f"-c lock_timeout={max(1, int(sidecar.lock_timeout * 1000))}",
            "-c idle_in_transaction_session_timeout=60000",
            "-c default_transaction_read_only=on",
            "-c jit=off",  # JIT compiling a catalog query costs more than running it
        ]
    )
    return create_engine(
        db,
        pool_size=sidecar.pool_size,
        max_overflow=0,
        pool_timeout=sidecar.query_timeout,
        pool_pre_ping=False,  # the probe is the ping; a stale connection is retried once
        pool_recycle=3600,
        isolation_level="AUTOCOMMIT",
        connect_args={
            "application_name": sidecar.application_name,
            "connect_timeout": max(2, math.ceil(sidecar.query_timeout)),
            "options": options,
        },
    )


@dataclass
class _CollectorState:
    duration: float = 0.0
    errors: int = 0
    last_success: float = 0.0
    failure: str | None = None
    cache: list[Metric] = field(default_factory=list)


class ServerExporter(RegistryCollector):
    """A prometheus_client collector that queries PostgreSQL on scrape (cheap) or reads cache."""

    def __init__(
        self,
        engine: Engine,
        *,
        options: Options | None = None,
        collectors: Sequence[Collector] | None = None,
        timeout: float = 2.0,
        refresh_timeout: float | None = None,
    ) -> None:
        self.engine = engine
        # Cached collectors run off the scrape path and grow with the catalog (sizes take ~1.6 s
        # at 10,000 tables), so their statements get a longer leash than the scrape's.
        self.refresh_timeout = max(timeout, refresh_timeout or timeout)
        # room for a checkout, a connect and the cheap queries, each under ``timeout``
        self.deadline = 2 * timeout + 1
        self.options = options or Options()
        self.collectors = list(collectors) if collectors is not None else default_collectors()
        self.timeout = timeout
        self.states = {collector.name: _CollectorState() for collector in self.collectors}
        self.probe = Histogram(PROBE_BUCKETS)
        self.up = 0
        self.last_refresh = 0.0  # monotonic time the refresh job last ran
        self._down: str | None = None
        self._scrape_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._state_lock = threading.Lock()

    # -- scrape path ------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        yield from self._scrape_within_deadline()
        for collector in self.collectors:
            if collector.cached:
                yield from self.states[collector.name].cache
        yield from self._own_metrics()

    def _scrape_within_deadline(self) -> list[Metric]:
        """Scrape on a worker thread and wait at most the deadline for it.

        Server-side timeouts cannot fire on a server that is frozen (SIGSTOP, a hung storage
        layer, a half-open TCP connection), and libpq has no client-side query timeout. So the
        queries run on a worker that holds the scrape lock until it returns, however late; the
        scrape itself answers ``dbops_pg_up 0`` at the deadline, and later scrapes do not pile
        up behind the stuck one: they cannot take the lock and answer at once.
        """
        if not self._scrape_lock.acquire(timeout=self.timeout):
            self._set_down("previous scrape still waiting for the database")
            return []
        result: list[list[Metric]] = []

        def work() -> None:
            try:
                result.append(self._scrape())
            finally:
                self._scrape_lock.release()

        worker = threading.Thread(target=work, name="scrape", daemon=True)
        worker.start()
        worker.join(self.deadline)
        if worker.is_alive():
            self._set_down(f"no answer within {self.deadline:g}s")
            return []
        return result[0] if result else []

    def _scrape(self) -> list[Metric]:
        cheap = [c for c in self.collectors if not c.cached]
        for attempt in (1, 2):
            started = time.perf_counter()
            try:
                with self.engine.connect() as connection:
                    self._probe(connection, started)
                    return self._run(connection, cheap)
            except exc.DBAPIError as error:
                # A connection the server dropped (restart) fails once, then a fresh one is made.
                if attempt == 1 and error.connection_invalidated:
                    continue
                self._set_down(error_line(error))
            except exc.SQLAlchemyError as error:  # pool timeout: the pool is busy or stuck
                self._set_down(error_line(error))
            break
        return []

    def _probe(self, connection: Connection, started: float) -> None:
        connection.exec_driver_sql("SELECT 1").scalar_one()
        self.probe.observe(time.perf_counter() - started)
        self._set_up()

    def _run(self, connection: Connection, collectors: Sequence[Collector]) -> list[Metric]:
        families: list[Metric] = []
        for collector in collectors:
            result = self._run_one(connection, collector)
            if result is None:
                break  # the connection is gone; the rest would fail the same way
            families.extend(result)
        return families

    def _run_one(self, connection: Connection, collector: Collector) -> list[Metric] | None:
        state = self.states[collector.name]
        started = time.perf_counter()
        try:
            result = collector.collect(connection, self.options)
        except exc.DBAPIError as error:
            self._record(collector.name, state, time.perf_counter() - started, error)
            if error.connection_invalidated:
                self._set_down(error_line(error))
                return None
            return []
        except Exception as error:  # a bug in one collector must not take down the others
            log.debug("collector %s failed", collector.name, exc_info=True)
            self._record(collector.name, state, time.perf_counter() - started, error)
            return []
        self._record(collector.name, state, time.perf_counter() - started, None)
        return result

    def _record(
        self, name: str, state: _CollectorState, duration: float, error: BaseException | None
    ) -> None:
        with self._state_lock:
            state.duration = duration
            if error is None:
                state.last_success = time.time()
                if state.failure is not None:
                    log.info("collector %s recovered", name)
                state.failure = None
                return
            state.errors += 1
            message = error_line(error)
            if message != state.failure:
                log.warning("collector %s failed: %s", name, message)
            state.failure = message

    def _set_up(self) -> None:
        with self._state_lock:
            if self._down is not None:
                log.info("database reachable again")
            self._down = None
            self.up = 1

    def _set_down(self, message: str) -> None:
        with self._state_lock:
            if message != self._down:
                log.warning("database unreachable: %s", message)
            self._down = message
            self.up = 0

    # -- refresh job (off the scrape path) ----------------------------------------------------

    def refresh(self) -> None:
        """Re-run the cached collectors; skipped (not an error) while the server is down.

        The work runs on a daemon thread, like a scrape: a refresh stuck on a frozen server
        must neither hold a scheduler thread forever nor keep the process from exiting.
        """
        # Liveness is about the job being run, not the database answering: a frozen server is
        # reported by dbops_pg_up, and restarting the sidecar would not thaw it.
        self.last_refresh = time.monotonic()
        cached = [c for c in self.collectors if c.cached]
        if not cached or not self._refresh_lock.acquire(blocking=False):
            return

        def work() -> None:
            try:
                self._refresh(cached)
            finally:
                self._refresh_lock.release()

        worker = threading.Thread(target=work, name="refresh", daemon=True)
        worker.start()
        worker.join(self.refresh_timeout * len(cached) + self.deadline)
        if worker.is_alive():
            self._set_down("cached collectors' refresh got no answer")

    def _refresh(self, cached: list[Collector]) -> None:
        try:
            with self.engine.connect() as connection:
                if self.refresh_timeout > self.timeout:
                    connection.exec_driver_sql(
                        f"SET statement_timeout = {int(self.refresh_timeout * 1000)}"
                    )
                for collector in cached:
                    result = self._run_one(connection, collector)
                    if result is None:
                        break
                    if self.states[collector.name].failure is None:
                        self.states[collector.name].cache = result
                else:
                    # back to the startup packet's value before the connection returns to the pool
                    connection.exec_driver_sql("RESET statement_timeout")
        except exc.SQLAlchemyError as error:
            self._set_down(error_line(error))

    # -- the exporter's own metrics -------------------------------------------------------------

    def _own_metrics(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "dbops_pg_up", "1 when the sidecar's probe query succeeded.", value=self.up
        )
        probe = HistogramMetricFamily(
            "dbops_probe_duration_seconds",
            "Round trip of the sidecar's probe query (checkout + SELECT 1).",
        )
        counts, total = self.probe.snapshot()
        cumulative, running = [], 0
        for bound, count in zip((*map(str, PROBE_BUCKETS), "+Inf"), counts, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        probe.add_metric([], cumulative, total)
        duration = GaugeMetricFamily(
            "dbops_collector_duration_seconds",
            "How long each collector's last run took.",
            labels=["collector"],
        )
        errors = CounterMetricFamily(
            "dbops_collector_errors", "Failed collector runs.", labels=["collector"]
        )
        success = GaugeMetricFamily(
            "dbops_collector_last_success_timestamp_seconds",
            "When each collector last succeeded (Unix time; 0 = never).",
            labels=["collector"],
        )
        with self._state_lock:
            for name, state in self.states.items():
                duration.add_metric([name], state.duration)
                errors.add_metric([name], state.errors)
                success.add_metric([name], state.last_success)
        return [up, probe, duration, errors, success]

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families vary with the server; skip the registry's collect-on-register


class ExporterService:
    """The exporter as a sidecar component: its engine, its refresh job, its health."""

    name = "exporter"

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        sidecar = settings.sidecar
        self.ttl = sidecar.collector_ttl
        self.lock_timeout = sidecar.lock_timeout
        self.disabled = sidecar.disabled_collectors
        self.engine = exporter_engine(settings)
        instrument(self.engine, registry)
        self.exporter = ServerExporter(
            self.engine,
            options=Options(top_n=sidecar.top_n),
            collectors=default_collectors(sidecar.disabled_collectors),
            timeout=sidecar.query_timeout,
            refresh_timeout=min(max(self.ttl / 2, sidecar.query_timeout), 60.0),
        )
        registry.register(self.exporter)
        self._started = time.monotonic()

    def start(self, scheduler: BaseScheduler) -> None:
        if self.disabled:
            log.info("exporter collectors disabled: %s", ", ".join(self.disabled))
        log.info(
            "exporter connects to %s (pool of %d, statement timeout %gs, lock timeout %gs)",
            redact_url(self.engine.url),
            self.engine.pool.size(),  # type: ignore[attr-defined]
            self.exporter.timeout,
            self.lock_timeout,
        )
        scheduler.add_job(
            self.exporter.refresh,
            "interval",
            seconds=self.ttl,
            id=REFRESH_JOB,
            name="refresh cached collectors",
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(self.ttl)),
        )

    def health_problems(self) -> list[str]:
        last = self.exporter.last_refresh or self._started
        stale_after = 3 * self.ttl + 30
        age = time.monotonic() - last
        if age > stale_after:
            return [f"exporter: refresh job has not run for {age:.0f}s"]
        return []

    def stop(self) -> None:
        self.engine.dispose()
