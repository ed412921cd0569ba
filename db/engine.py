"""The process's pooled connection manager.

One engine per process, built from :mod:`db.settings`. A connection that comes back from the pool
inside a broken transaction is replaced rather than handed out.

Forked workers (gunicorn, Celery prefork) inherit the parent's pool, sockets included, and a
socket used by two processes gives both of them wrong answers or hangs. So, as SQLAlchemy
documents for ``os.fork()``, every engine made here gets a new, empty pool in the child
(``dispose(close=False)``, which leaves the parent's connections alone) before the child runs
anything else; and the pool checks the pid stamped on a connection when it takes it out of the
queue, before recycling, pre-ping or any listener could use it, and drops one opened by another
process without closing it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import event, exc, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool
from sqlalchemy.util import queue as sqla_queue

from db.errors import DatabaseDisabled, error_line
from db.pgurl import sqlalchemy_url
from db.settings import DbSettings, database_enabled, load_db_settings

if TYPE_CHECKING:  # the ORM costs 6 MB of resident memory; the sidecar never opens a session
    from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIN_SERVER_VERSION = 130000

_lock = threading.Lock()
_engine: Engine | None = None
_sessions: sessionmaker[Session] | None = None
_enabled: bool | None = None  # DB_ENABLED, read once per process (or after dispose())
DISABLED_MESSAGE = "the database is switched off (DB_ENABLED=false)"
_fork_safe: weakref.WeakSet[Engine] = weakref.WeakSet()


class ForkSafeQueuePool(QueuePool):
    """A QueuePool that never uses, or closes, a connection another process opened.

    The check sits in ``_do_get`` because everything after it touches the socket:
    ``get_connection`` closes a connection past ``pool_recycle``, pre-ping sends a query, and
    only then does the ``checkout`` event run.
    """

    # SQLAlchemy names a pool's logger after its class's module; under ``sqlalchemy.`` it keeps
    # SQLAlchemy's WARNING default instead of logging every dispose at the process's INFO.
    _sqla_logger_namespace = "sqlalchemy.pool.impl.QueuePool"

    def _do_get(self) -> ConnectionPoolEntry:
        record = super()._do_get()
        _disown_if_inherited(record)
        return record

    def dispose(self) -> None:
        queue = self._pool
        if isinstance(queue, sqla_queue.Queue):  # QueuePool.dispose closes all it finds here
            with queue.mutex:
                for record in list(queue.queue):
                    _disown_if_inherited(record)
        super().dispose()


def _disown_if_inherited(record: ConnectionPoolEntry) -> None:
    """Forget a connection opened in another process, without a byte on its socket."""
    owner = record.info.get("pid")
    if owner is not None and owner != os.getpid() and record.dbapi_connection is not None:
        log.debug("dropping a pooled connection inherited from pid %s", owner)
        record.dbapi_connection = None  # type: ignore[misc]  # the next use reconnects
        record.finalize_callback.clear()  # type: ignore[attr-defined]


def create_engine(settings: DbSettings, **overrides: Any) -> Engine:
    """A new engine with the pool the settings describe; ``overrides`` go to SQLAlchemy."""
    connect_args: dict[str, Any] = {
        "application_name": settings.application_name,
        "connect_timeout": settings.connect_timeout,
    }
    if settings.statement_timeout > 0:
        connect_args["options"] = f"-c statement_timeout={int(settings.statement_timeout * 1000)}"
    options: dict[str, Any] = {
        "poolclass": ForkSafeQueuePool,
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
        "pool_recycle": settings.pool_recycle or -1,
        "pool_pre_ping": settings.pool_pre_ping,
        "pool_use_lifo": True,
        "connect_args": connect_args,
    }
    options.update(overrides)
    engine = sa_create_engine(sqlalchemy_url(settings.url), **options)
    install_listeners(engine)
    return engine


def install_listeners(engine: Engine) -> None:
    """Stamp connections with their pid and check them on checkout; renew the pool on fork."""
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "checkout", _on_checkout)
    _fork_safe.add(engine)


def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info["pid"] = os.getpid()
    version = int(getattr(dbapi_connection, "server_version", 0) or 0)
    if version and version < MIN_SERVER_VERSION:
        raise exc.DisconnectionError(
            f"PostgreSQL server {version} is too old; {MIN_SERVER_VERSION // 10000} or newer needed"
        )


def _on_checkout(
    dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
) -> None:
    pid = os.getpid()
    if record.info.get("pid") != pid:
        # Inherited across fork, from a pool given as ``poolclass=`` that does not check it
        # earlier (with pre-ping on, the ping has run by now). Drop it without closing it.
        record.dbapi_connection = proxy.dbapi_connection = None  # type: ignore[misc]
        raise exc.DisconnectionError(
            f"connection opened in pid {record.info.get('pid')}, checked out in pid {pid}"
        )
    status = getattr(dbapi_connection, "info", None)
    if status is not None and status.transaction_status not in (0, 1):  # neither IDLE nor ACTIVE
        raise exc.DisconnectionError("connection returned to the pool inside a transaction")


def enabled() -> bool:
    """Whether ``DB_ENABLED`` lets this process use its database (read once, then cached)."""
    global _enabled
    if _enabled is None:
        _enabled = database_enabled()
    return _enabled


def get_engine() -> Engine:
    """The process's engine, created on first use from the environment.

    Raises :class:`~db.errors.DatabaseDisabled` when ``DB_ENABLED=false``: the rollback switch
    that takes the database out of a service's path without a code change.
    """
    global _engine, _sessions
    if not enabled():
        raise DatabaseDisabled(DISABLED_MESSAGE)
    with _lock:
        if _engine is None:
            _engine = create_engine(load_db_settings())
            from sqlalchemy.orm import sessionmaker

            _sessions = sessionmaker(bind=_engine, expire_on_commit=False)
        return _engine


def configure(engine: Engine) -> None:
    """Make ``engine`` the process's engine (tests, or services that build their own).

    Its pool is renewed in forked children like the pools of engines made here.
    """
    global _engine, _sessions
    with _lock:
        _fork_safe.add(engine)
        _engine = engine
        from sqlalchemy.orm import sessionmaker

        _sessions = sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session whose work commits when the block ends and rolls back if it raises."""
    if engine is None:
        get_engine()
        assert _sessions is not None
        session = _sessions()
    else:
        from sqlalchemy.orm import Session

        session = Session(bind=engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@dataclass(frozen=True)
class Health:
    ok: bool
    latency_seconds: float
    server_version: str | None
    database: str | None
    error: str | None = None
    status: str = ""  # "ok", "failed", or "disabled" (DB_ENABLED=false)

    def __post_init__(self) -> None:
        if not self.status:
            object.__setattr__(self, "status", "ok" if self.ok else "failed")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def health_check(engine: Engine | None = None) -> Health:
    """A round trip through the pool: whether it worked, how long it took, what answered.
    With ``DB_ENABLED=false`` it reports ``status="disabled"`` without connecting."""
    if engine is None and not enabled():
        return Health(False, 0.0, None, None, DISABLED_MESSAGE, status="disabled")
    engine = engine or get_engine()
    started = time.perf_counter()
    try:
        with engine.connect() as connection:
            row = connection.execute(
                text("SELECT current_setting('server_version'), current_database()")
            ).one()
        return Health(True, time.perf_counter() - started, row[0], row[1])
    except exc.SQLAlchemyError as error:
        return Health(False, time.perf_counter() - started, None, None, error_line(error))


@dataclass(frozen=True)
class PoolStatus:
    size: int
    max_overflow: int
    checked_out: int
    overflow: int
    idle: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def pool_status(engine: Engine | None = None) -> PoolStatus:
    """How the pool is used right now; ``overflow`` counts connections open beyond ``size``.

    The same numbers as the ``dbops_pool_*`` gauges of :mod:`db.metrics`.
    """
    pool = (engine or get_engine()).pool
    if not isinstance(pool, QueuePool):
        return PoolStatus(0, 0, pool.checkedout() if hasattr(pool, "checkedout") else 0, 0, 0)
    size = pool.size()
    checked_out = pool.checkedout()
    return PoolStatus(
        size=size,
        max_overflow=pool._max_overflow,
        checked_out=checked_out,
        overflow=max(0, pool.overflow()),
        idle=pool.checkedin(),
    )


def dispose() -> None:
    """Close every pooled connection of the process's engine and forget it (and the
    ``DB_ENABLED`` it read, so the next use reads it again).

    In a forked child this closes the child's own connections only: the pool it inherited was
    replaced at fork, and the parent's connections are never closed from here.
    """
    global _engine, _sessions, _enabled
    _enabled = None
    with _lock:
        if _engine is not None:
            _engine.dispose()
        _engine = None
        _sessions = None


def _renew_pools_in_child() -> None:
    """Runs in a forked child before anything else: a fresh pool for every engine made here.

    ``dispose(close=False)`` drops the inherited pool without closing the parent's connections
    (psycopg2 does not close a connection object collected in a process that did not open it),
    and the new pool starts with no connections, no checkout counts and no lock that a thread of
    the parent held at the moment of fork. The module lock is renewed for the same reason.
    """
    global _lock
    _lock = threading.Lock()
    for engine in list(_fork_safe):
        try:
            engine.dispose(close=False)
        except Exception as error:  # the pid check in ForkSafeQueuePool still holds
            log.warning("could not renew the pool after fork: %s", error_line(error))


os.register_at_fork(after_in_child=_renew_pools_in_child)
