"""Pool and query metrics for any process that uses :mod:`db`, in one call.

``instrument(engine)`` makes the engine's pool and statements observable under the names of the
metrics contract (``dbops_pool_*``, ``dbops_query_*``), labelled ``pool`` with the engine's
application name. Server-side exporters cannot see a client's pool: how many threads wait for a
connection, how long they wait, how often they give up. Only the process that owns the pool can,
so these numbers are taken where they happen and kept exact:

* the gauges (size, checked out, idle, overflow, waiting) are read from the pool when scraped,
  never maintained by event bookkeeping that can drift;
* waiting threads are counted inside the pool's queue, under the queue's own mutex, only while
  they actually block;
* checkout time and ``sqlalchemy.exc.TimeoutError`` are taken around ``Pool.connect``;
* statements are timed around the dialect's ``do_execute*``, which adds no SQLAlchemy event
  listener (any Connection listener puts every statement on the slower dispatch path).

The hot path (one checkout and one statement) costs about two microseconds: histograms here are a
bisect and one uncontended lock, not prometheus_client's per-bucket locks.

A forked child (gunicorn, Celery prefork) starts from zero: its counters and histograms count its
own work only, so summing workers and their parent does not count the parent's history again, and
every lock here is renewed, in case a thread of the parent held one at the moment of fork. Its
pool gauges are read from the pool, which :mod:`db.engine` renews in the child.
"""

from __future__ import annotations

import inspect
import os
import re
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from time import perf_counter
from typing import Any

import sqlalchemy
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import make_wsgi_app as _prometheus_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import event, exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.util import queue as sqla_queue

OPERATIONS = ("select", "insert", "update", "delete", "other")
# 100 ms is the seed's latency target: buckets are dense around it so p95 resolves it.
QUERY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
WAIT_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
DEFAULT_POOL_NAME = "sqlalchemy"
_OPERATION_CACHE_LIMIT = 4096


class Histogram:
    """Bucket counts and a sum; cumulative only when read, so an observation is one increment."""

    __slots__ = ("_lock", "bounds", "counts", "total")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf
        self.total = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = bisect_left(self.bounds, value)
        with self._lock:
            self.counts[index] += 1
            self.total += value

    def snapshot(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self.counts), self.total

    def reset_after_fork(self) -> None:
        """Zero, with a new lock; in place, because hot paths hold bound ``observe`` methods."""
        self._lock = threading.Lock()
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0


_VERBS = ("select", "insert", "update", "delete")
_LEADING_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)
_WORD = re.compile(r"[A-Za-z_]+")
_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|[()]|[A-Za-z_][A-Za-z_0-9]*")


def classify(statement: str) -> str:
    """The operation of a statement: its first keyword, or for ``WITH ...`` the verb of the
    statement that follows the common table expressions. Runs once per distinct SQL string."""
    text = _LEADING_COMMENTS.sub("", statement, count=1).lstrip("( \t\r\n")
    first = _WORD.match(text)
    word = first.group(0).lower() if first else ""
    if word in _VERBS:
        return word
    if word != "with":
        return "other"
    depth = 0
    for token in _TOKENS.findall(text):
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
        elif depth == 0 and (verb := str(token).lower()) in _VERBS:
            return verb
    return "other"


class EngineMetrics:
    """What one engine has done; returned by :func:`instrument`."""

    def __init__(self, engine: Engine, pool_name: str) -> None:
        self.pool_name = pool_name
        self._engine = weakref.ref(engine)
        self._lock = threading.Lock()
        self.queries = {operation: Histogram(QUERY_BUCKETS) for operation in OPERATIONS}
        self.query_errors = dict.fromkeys(OPERATIONS, 0)
        self.wait = Histogram(WAIT_BUCKETS)
        self.timeouts = 0
        self.invalidations = 0
        self.connects = 0
        self.connect_errors = 0
        self._operations: dict[str, str] = {}

    @property
    def engine(self) -> Engine | None:
        return self._engine()

    def operation(self, statement: str) -> str:
        # Statement strings repeat (SQLAlchemy caches compiled SQL), so this is one dict hit.
        found = self._operations.get(statement)
        if found is None:
            found = classify(statement)
            if len(self._operations) >= _OPERATION_CACHE_LIMIT:
                self._operations.clear()
            self._operations[statement] = found
        return found

    def count(self, attribute: str) -> None:
        with self._lock:
            setattr(self, attribute, getattr(self, attribute) + 1)

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        for histogram in (self.wait, *self.queries.values()):
            histogram.reset_after_fork()
        for operation in self.query_errors:
            self.query_errors[operation] = 0
        self.timeouts = self.invalidations = self.connects = self.connect_errors = 0

    def count_query_error(self, operation: str) -> None:
        with self._lock:
            self.query_errors[operation] += 1

    def timed(self, execute: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a dialect ``do_execute*`` method: time it, classify it, count its errors.

        Done at the dialect rather than with ``before/after_cursor_execute`` listeners because
        any Connection event switches SQLAlchemy onto its slower event-dispatch path for every
        statement, which alone cost more than the whole budget of this module.
        """
        histograms = self.queries
        known = self._operations
        operation = self.operation

        def timed_execute(cursor: Any, statement: str, *args: Any) -> Any:
            started = perf_counter()
            try:
                result = execute(cursor, statement, *args)
            except Exception:
                self.count_query_error(operation(statement))
                raise
            elapsed = perf_counter() - started
            histograms[known.get(statement) or operation(statement)].observe(elapsed)
            return result

        return timed_execute

    def on_connect(self, dbapi_connection: Any, record: Any) -> None:
        self.count("connects")

    def on_invalidate(self, dbapi_connection: Any, record: Any, exception: Any) -> None:
        self.count("invalidations")


_queue_get = sqla_queue.Queue.get


class _WaitCountingQueue(sqla_queue.Queue[Any]):
    """The pool's queue, counting the threads blocked in ``get`` under the queue's own mutex.

    QueuePool asks for a blocking ``get`` only once the overflow is used up; every other
    checkout takes the non-blocking branch, which adds one test and one call, nothing more.
    """

    waiting = 0

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not block:
            return _queue_get(self, False)
        with self.mutex:  # an RLock: Queue.get re-enters it, Condition.wait releases it fully
            if not self._empty():
                return _queue_get(self, True, timeout)
            self.waiting += 1
            try:
                return _queue_get(self, True, timeout)
            finally:
                self.waiting -= 1


def _instrumented_pool_class(base: type[QueuePool], metrics: EngineMetrics) -> type[QueuePool]:
    """A subclass of the pool's class; ``Pool.recreate`` (engine.dispose) keeps it."""
    base_connect = base.connect
    observe = metrics.wait.observe

    def connect(self: QueuePool) -> Any:
        started = perf_counter()
        try:
            connection = base_connect(self)
        except exc.TimeoutError:
            observe(perf_counter() - started)
            metrics.count("timeouts")
            raise
        except Exception:
            metrics.count("connect_errors")
            raise
        observe(perf_counter() - started)
        return connection

    namespace = {
        "_queue_class": _WaitCountingQueue,
        "_dbops_metrics": metrics,
        "connect": connect,
        # log as the pool it instruments (under sqlalchemy.*, WARNING by default), not as a
        # class of this module, which would log every dispose at the process's level
        "_sqla_logger_namespace": getattr(base, "_sqla_logger_namespace", None)
        or f"{base.__module__}.{base.__name__}",
    }
    return type(f"Instrumented{base.__name__}", (base,), namespace)


def pool_name_of(engine: Engine) -> str:
    """The ``application_name`` the engine connects with: URL query, else ``connect_args``."""
    name = engine.url.query.get("application_name")
    if isinstance(name, str) and name:
        return name
    creator = getattr(engine.pool, "_creator", None)
    if creator is not None:
        try:
            params = inspect.getclosurevars(creator).nonlocals.get("cparams")
        except (TypeError, ValueError):
            params = None
        if params is not None and params.get("application_name"):
            return str(params["application_name"])
    return DEFAULT_POOL_NAME


class PoolCollector(Collector):
    """Exports every engine instrumented into one registry, summed per ``pool`` label."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: list[EngineMetrics] = []

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()

    def add(self, metrics: EngineMetrics) -> None:
        with self._lock:
            if metrics not in self._engines:
                self._engines.append(metrics)

    def live(self) -> list[tuple[EngineMetrics, Engine]]:
        with self._lock:
            pairs = [(m, e) for m in self._engines if (e := m.engine) is not None]
            self._engines = [m for m, _ in pairs]
        return pairs

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self.live()))

    def describe(self) -> Iterator[Metric]:
        return iter(self._families([]))

    def _families(self, engines: list[tuple[EngineMetrics, Engine]]) -> list[Metric]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["pool"])

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["pool", *extra])

        size = gauge("dbops_pool_size", "Connections the pool keeps open (pool_size).")
        max_overflow = gauge("dbops_pool_max_overflow", "Connections allowed beyond pool_size.")
        checked_out = gauge("dbops_pool_checked_out", "Connections checked out of the pool now.")
        idle = gauge("dbops_pool_idle", "Open connections idle in the pool now.")
        overflow = gauge("dbops_pool_overflow", "Connections open beyond pool_size now.")
        waiting = gauge("dbops_pool_waiting", "Threads blocked waiting for a connection now.")
        wait = HistogramMetricFamily(
            "dbops_pool_wait_seconds",
            "Time a checkout took to hand out a usable connection.",
            labels=["pool"],
        )
        timeouts = counter("dbops_pool_timeouts", "Checkouts that gave up after pool_timeout.")
        invalidations = counter("dbops_pool_invalidations", "Pooled connections invalidated.")
        connects = counter("dbops_pool_connects", "New database connections the pool opened.")
        connect_errors = counter(
            "dbops_pool_connect_errors", "Attempts to open a database connection that failed."
        )
        queries = HistogramMetricFamily(
            "dbops_query_duration_seconds",
            "Statement execution time by operation.",
            labels=["pool", "operation"],
        )
        errors = counter("dbops_query_errors", "Statements that raised an error.", ("operation",))

        by_pool: dict[str, list[tuple[EngineMetrics, Engine]]] = {}
        for metrics, engine in engines:
            by_pool.setdefault(metrics.pool_name, []).append((metrics, engine))
        for name, members in sorted(by_pool.items()):
            pools = [engine.pool for _, engine in members]
            queue_pools = [p for p in pools if isinstance(p, QueuePool)]
            if queue_pools:
                sizes = [_pool_gauges(p) for p in queue_pools]
                for family, index in (
                    (size, 0),
                    (max_overflow, 1),
                    (checked_out, 2),
                    (idle, 3),
                    (overflow, 4),
                    (waiting, 5),
                ):
                    family.add_metric([name], sum(values[index] for values in sizes))
            group = [metrics for metrics, _ in members]
            _add_histogram(wait, [name], WAIT_BUCKETS, [m.wait for m in group])
            timeouts.add_metric([name], sum(m.timeouts for m in group))
            invalidations.add_metric([name], sum(m.invalidations for m in group))
            connects.add_metric([name], sum(m.connects for m in group))
            connect_errors.add_metric([name], sum(m.connect_errors for m in group))
            for operation in OPERATIONS:
                histograms = [m.queries[operation] for m in group]
                _add_histogram(queries, [name, operation], QUERY_BUCKETS, histograms)
                errors.add_metric([name, operation], sum(m.query_errors[operation] for m in group))
        return [
            size,
            max_overflow,
            checked_out,
            idle,
            overflow,
            waiting,
            wait,
            timeouts,
            invalidations,
            connects,
            connect_errors,
            queries,
            errors,
        ]


def _pool_gauges(pool: QueuePool) -> tuple[int, int, int, int, int, int]:
    size = pool.size()
    max_overflow = max(0, pool._max_overflow)
    return (
        size,
        max_overflow,
        pool.checkedout(),
        pool.checkedin(),
        max(0, pool.overflow()),
        int(getattr(pool._pool, "waiting", 0)),
    )


def _add_histogram(
    family: HistogramMetricFamily,
    labels: list[str],
    bounds: tuple[float, ...],
    histograms: list[Histogram],
) -> None:
    counts = [0] * (len(bounds) + 1)
    total = 0.0
    for histogram in histograms:
        snapshot, subtotal = histogram.snapshot()
        counts = [a + b for a, b in zip(counts, snapshot, strict=True)]
        total += subtotal
    cumulative, running = [], 0
    for bound, count in zip((*map(str, bounds), "+Inf"), counts, strict=True):
        running += count
        cumulative.append((bound, float(running)))
    family.add_metric(labels, cumulative, total)


_lock = threading.Lock()
_instrumented: weakref.WeakKeyDictionary[Engine, EngineMetrics] = weakref.WeakKeyDictionary()
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, PoolCollector] = (
    weakref.WeakKeyDictionary()
)


def instrument(
    engine: Engine, registry: CollectorRegistry | None = None, *, pool_name: str | None = None
) -> EngineMetrics:
    """Export ``engine``'s pool and query metrics into ``registry`` (default: the global one).

    Calling it again for the same engine returns the same :class:`EngineMetrics` and adds no
    second set of listeners; calling it with another registry exports the engine there too.
    """
    registry = REGISTRY if registry is None else registry
    with _lock:
        metrics = _instrumented.get(engine)
        if metrics is None:
            metrics = EngineMetrics(engine, pool_name or pool_name_of(engine))
            _attach(engine, metrics)
            _instrumented[engine] = metrics
        collector = _collectors.get(registry)
        if collector is None:
            collector = PoolCollector()
            registry.register(collector)
            _collectors[registry] = collector
        collector.add(metrics)
    return metrics


# The SQLAlchemy releases whose pool and dialect internals this module was tested against
# (CI runs the suite on the lock and on the newest release the range admits). Another release
# may count waiters or time statements wrongly without failing, so it is refused instead.
SUPPORTED_SQLALCHEMY = ((2, 0), (2, 1))


class UnsupportedSQLAlchemy(RuntimeError):
    """``instrument()`` cannot trust this SQLAlchemy's internals; the message says why."""


def check_sqlalchemy(version: str = sqlalchemy.__version__) -> None:
    """Raise :class:`UnsupportedSQLAlchemy` unless the internals ``instrument()`` reaches into
    (QueuePool's queue and overflow, the queue's mutex, the dialect's ``do_execute*``) are
    those of a supported release."""
    supported = ", ".join(f"{major}.{minor}.x" for major, minor in SUPPORTED_SQLALCHEMY)
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match[1]), int(match[2])) not in SUPPORTED_SQLALCHEMY:
        raise UnsupportedSQLAlchemy(
            f"db.metrics supports SQLAlchemy {supported}; this is {version}. Install a supported "
            "release, or run without instrument() (the pool still works, unmeasured)"
        )
    missing = [
        name
        for owner, name in (
            (QueuePool, "_queue_class"),
            (QueuePool, "_is_asyncio"),
            (sqla_queue.Queue, "_empty"),
            (sqla_queue.Queue, "get"),
        )
        if not hasattr(owner, name)
    ]
    if missing:
        raise UnsupportedSQLAlchemy(
            f"db.metrics supports SQLAlchemy {supported}; {version} lacks "
            f"{', '.join(missing)}, which the pool metrics rely on"
        )


def _check_engine(engine: Engine) -> None:
    """Every internal ``_attach`` touches, checked before it changes anything."""
    check_sqlalchemy()
    needed: list[tuple[object, str]] = [(engine.dialect, n) for n in TIMED_DIALECT_METHODS]
    if isinstance(engine.pool, QueuePool):
        needed += [(engine.pool, "_pool"), (engine.pool, "_max_overflow")]
    for owner, name in needed:
        if not hasattr(owner, name):
            raise UnsupportedSQLAlchemy(
                f"db.metrics: SQLAlchemy {sqlalchemy.__version__}'s "
                f"{type(owner).__name__} has no {name}, which the metrics rely on"
            )


TIMED_DIALECT_METHODS = ("do_execute", "do_executemany", "do_execute_no_params")


def _attach(engine: Engine, metrics: EngineMetrics) -> None:
    _check_engine(engine)
    pool: Pool = engine.pool
    if isinstance(pool, QueuePool) and not pool._is_asyncio:
        pool.__class__ = _instrumented_pool_class(type(pool), metrics)
        queue = pool._pool
        if type(queue) is sqla_queue.Queue:
            queue.__class__ = _WaitCountingQueue
    dialect = engine.dialect  # each create_engine() builds its own dialect instance
    for name in TIMED_DIALECT_METHODS:
        setattr(dialect, name, metrics.timed(getattr(dialect, name)))
    # Pool events only: they fire per new connection or invalidation, not per statement.
    listeners: list[tuple[str, Callable[..., Any]]] = [
        ("connect", metrics.on_connect),
        ("invalidate", metrics.on_invalidate),
        ("soft_invalidate", metrics.on_invalidate),
    ]
    for name, listener in listeners:
        event.listen(engine, name, listener)


def _reset_in_child() -> None:
    """Runs in a forked child before anything else (see the module's docstring)."""
    global _lock
    _lock = threading.Lock()
    for metrics in list(_instrumented.values()):
        metrics.reset_after_fork()
    for collector in list(_collectors.values()):
        collector.reset_after_fork()


os.register_at_fork(after_in_child=_reset_in_child)


def make_wsgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """A WSGI app serving the registry in the Prometheus text format (mount it at /metrics)."""
    return _prometheus_wsgi_app(REGISTRY if registry is None else registry)


def make_asgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """The same for ASGI services (mount it at /metrics next to the service's own routes)."""
    from prometheus_client import make_asgi_app as prometheus_asgi_app

    return prometheus_asgi_app(REGISTRY if registry is None else registry)


class MetricsServer:
    """A background HTTP server for ``/metrics``; :meth:`shutdown` stops and joins it."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client.exposition import start_wsgi_server

        self._server, self._thread = start_wsgi_server(
            port, addr=host, registry=REGISTRY if registry is None else registry
        )
        self.host = host
        self.port = int(self._server.server_address[1])

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    host: str, port: int, registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve the registry on ``http://host:port/metrics`` from a daemon thread (port 0: any)."""
    return MetricsServer(host, port, registry)
