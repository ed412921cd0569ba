"""The engine in forked workers (gunicorn, Celery prefork): children never touch the parent's
sockets, on checkout (pre-ping included), on ``dispose()`` or when the inherited pool is dropped,
and parent and children query concurrently and each gets its own answers."""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection as Pipe
from typing import Any

import psycopg2
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, Engine

from db import engine as db_engine
from db import metrics as db_metrics
from db.settings import load_db_settings
from tests.pgcluster import wait_for

APP = "t-fork"
CHILDREN = 4
ROUNDS = 50
CHILD_TIMEOUT = 90.0

Work = Callable[[int], dict[str, Any]]


@pytest.fixture
def engine(migrated_db: URL) -> Iterator[Engine]:
    settings = load_db_settings(
        {
            "DATABASE_URL": migrated_db.render_as_string(hide_password=False),
            "DB_POOL_SIZE": "4",
            "DB_MAX_OVERFLOW": "2",
            "DB_POOL_TIMEOUT": "10",
            "DB_STATEMENT_TIMEOUT": "20s",
            "DB_APPLICATION_NAME": APP,
        }
    )
    assert settings.pool_pre_ping  # the default, and the path that used the parent's socket
    built = db_engine.create_engine(settings)
    db_engine.configure(built)
    yield built
    db_engine.dispose()
    built.dispose()


@pytest.fixture
def admin(migrated_db: URL, engine_for: Callable[..., Engine]) -> Engine:
    """A separate engine that watches the server side; the children never use it."""
    return engine_for(migrated_db, isolation_level="AUTOCOMMIT")


class Children:
    """Forked children (multiprocessing's 'fork' start method) whose results come back by pipe."""

    def __init__(self, work: Work, count: int) -> None:
        context = multiprocessing.get_context("fork")
        self.pipes: list[Pipe] = []
        self.processes: list[Any] = []
        for index in range(count):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=self._run, args=(work, index, sender), daemon=True)
            self.pipes.append(receiver)
            self.processes.append(process)
        for process in self.processes:
            process.start()

    @staticmethod
    def _run(work: Work, index: int, sender: Pipe) -> None:  # pragma: no cover - in the child
        try:
            result: dict[str, Any] = {"ok": True, **work(index)}
        except BaseException as error:  # reported to the parent, which fails the test
            result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        sender.send(result)
        sender.close()

    def kill(self) -> None:
        """End the children still running (none, once their results are in)."""
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(5)

    def results(self, timeout: float = CHILD_TIMEOUT) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        results = []
        try:
            for index, (pipe, process) in enumerate(zip(self.pipes, self.processes, strict=True)):
                if not pipe.poll(max(0.0, deadline - time.monotonic())):
                    pytest.fail(f"child {index} (pid {process.pid}) hung for {timeout:.0f} s")
                results.append(pipe.recv())
                process.join(max(0.0, deadline - time.monotonic()))
                assert process.exitcode == 0, f"child {index} exited with {process.exitcode}"
        finally:
            self.kill()
        failed = [result["error"] for result in results if not result["ok"]]
        assert not failed, failed
        return results


def backend_pid(connection: Connection) -> int:
    return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def warm(engine: Engine, count: int) -> set[int]:
    """Open ``count`` pooled connections at once and return them to the pool, idle."""
    held = [engine.connect() for _ in range(count)]
    try:
        return {backend_pid(connection) for connection in held}
    finally:
        for connection in held:
            connection.close()


def server_view(admin: Engine, backends: set[int]) -> dict[int, tuple[str, Any, Any]]:
    """What the server says about ``backends``: state, last state change, transaction start."""
    with admin.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT pid, state, state_change, xact_start FROM pg_stat_activity"
                " WHERE pid = ANY(:pids)"
            ),
            {"pids": sorted(backends)},
        ).all()
    return {int(row[0]): (str(row[1]), row[2], row[3]) for row in rows}


def test_a_child_never_sends_a_byte_on_the_sockets_it_inherits(
    engine: Engine, admin: Engine
) -> None:
    parent_backends = warm(engine, 3)  # three idle connections in the pool, inherited by the child
    before = server_view(admin, parent_backends)
    assert {state for state, _, _ in before.values()} == {"idle"}

    def child(_: int) -> dict[str, Any]:
        with engine.connect() as connection:  # pre-ping would run here on an inherited one
            mine = backend_pid(connection)
        engine.dispose()  # the SQLAlchemy call a worker's shutdown hook makes
        db_engine.dispose()  # and the module's
        gc.collect()  # whatever the child dropped of its parent's pool is finalized now
        kept = [
            found
            for found in gc.get_objects()
            if isinstance(found, psycopg2.extensions.connection)
            and not found.closed
            and found.get_backend_pid() in parent_backends  # libpq's copy: no I/O
        ]
        return {"backend": mine, "kept": len(kept)}

    (result,) = Children(child, 1).results()

    assert result["backend"] not in parent_backends
    assert result["kept"] == 0  # the child let go of every inherited connection object
    # Not one statement, BEGIN or Terminate reached the parent's sessions from the child.
    assert server_view(admin, parent_backends) == before
    # And the parent reuses them as they were: no reconnection, so no new backend.
    assert warm(engine, 3) == parent_backends


def test_without_the_fork_hook_the_pool_still_never_pings_or_closes_an_inherited_connection(
    engine: Engine, admin: Engine
) -> None:
    # As if the child came from a fork that skips Python's at-fork hooks: the child keeps the
    # inherited pool, and only the pool's own pid check stands between it and the parent.
    db_engine._fork_safe.discard(engine)
    parent_backends = warm(engine, 3)
    before = server_view(admin, parent_backends)

    def child(_: int) -> dict[str, Any]:
        with engine.connect() as connection:  # pre-ping is on: the check must come first
            mine = backend_pid(connection)
        engine.dispose()
        gc.collect()
        return {"backend": mine}

    (result,) = Children(child, 1).results()

    assert result["backend"] not in parent_backends
    assert server_view(admin, parent_backends) == before
    assert warm(engine, 3) == parent_backends


def test_parent_and_children_query_concurrently_and_each_gets_its_own_answers(
    engine: Engine, admin: Engine
) -> None:
    connects: list[int] = []
    event.listen(engine, "connect", lambda *_: connects.append(os.getpid()))
    idle_backends = warm(engine, 3)
    held = engine.connect()  # checked out, inside an open transaction, across every fork
    held.begin()
    held.execute(text("CREATE TEMP TABLE fork_guard (value int)"))
    held.execute(text("INSERT INTO fork_guard VALUES (42)"))
    held_backend = backend_pid(held)
    held_xid = int(held.execute(text("SELECT txid_current()")).scalar_one())
    parent_backends = idle_backends | {held_backend}
    connects_before = len(connects)

    def child(index: int) -> dict[str, Any]:
        sessions: set[tuple[int, str]] = set()  # pid and start: pids are reused
        wrong: list[str] = []
        for round_ in range(ROUNDS):
            token = f"child-{index}-{os.getpid()}-{round_}"
            with db_engine.session_scope(engine) as session:
                backend, started, echoed, name = session.execute(
                    text(
                        "SELECT pid, CAST(backend_start AS text), CAST(:token AS text),"
                        " current_setting('application_name')"
                        " FROM pg_stat_activity WHERE pid = pg_backend_pid()"
                    ),
                    {"token": token},
                ).one()
            if echoed != token or name != APP:
                wrong.append(f"round {round_}: sent {token!r}, got {echoed!r} from {name!r}")
            sessions.add((int(backend), started))
            if round_ == ROUNDS // 2:
                engine.dispose()  # mid-run: closes the child's own connections, not the parent's
        engine.dispose()
        return {"sessions": sorted(sessions), "wrong": wrong}

    parent_seen: set[int] = set()
    parent_wrong: list[str] = []
    parent_rounds = [0]
    children_done = threading.Event()

    def parent_queries() -> None:
        try:
            query_until_children_finish()
        except Exception as error:
            parent_wrong.append(f"round {parent_rounds[0]}: {type(error).__name__}: {error}")

    def query_until_children_finish() -> None:
        while not children_done.is_set() or parent_rounds[0] < ROUNDS:
            token = f"parent-{parent_rounds[0]}"
            with db_engine.session_scope(engine) as session:
                backend, echoed = session.execute(
                    text("SELECT pg_backend_pid(), CAST(:token AS text)"), {"token": token}
                ).one()
                # A BEGIN from a child on this socket shows as "already a transaction in progress".
                notices = session.connection().connection.driver_connection.notices  # type: ignore[union-attr]
            if echoed != token or notices:
                parent_wrong.append(f"sent {token!r}, got {echoed!r}, notices {notices}")
            parent_seen.add(int(backend))
            guard = held.execute(text("SELECT value FROM fork_guard")).scalar_one()
            xid = int(held.execute(text("SELECT txid_current()")).scalar_one())
            if (guard, xid, backend_pid(held)) != (42, held_xid, held_backend):
                parent_wrong.append(f"open transaction disturbed: {guard}, {xid}")
            parent_rounds[0] += 1

    parent = threading.Thread(target=parent_queries, daemon=True)
    # Half the children are forked with the parent's connections idle in the pool, half while
    # the parent's thread is mid-stream with its sockets in use.
    groups = [Children(child, CHILDREN // 2)]
    parent.start()
    try:
        started = wait_for(lambda: parent_rounds[0] >= 5 or parent_wrong, 30)
        assert started, f"the parent's queries hung after {parent_rounds[0]} rounds"
        groups.append(Children(child, CHILDREN - CHILDREN // 2))
        results = [result for group in groups for result in group.results()]
    finally:
        children_done.set()
        for group in groups:
            group.kill()
    parent.join(CHILD_TIMEOUT)
    assert not parent.is_alive(), f"the parent hung after {parent_rounds[0]} rounds"

    assert parent_wrong == []
    assert parent_rounds[0] >= ROUNDS
    child_sessions = [{tuple(found) for found in result["sessions"]} for result in results]
    for index, result in enumerate(results):
        assert result["wrong"] == [], f"child {index}: {result['wrong']}"
        assert child_sessions[index], f"child {index} ran no query"
        used = {pid for pid, _ in child_sessions[index]}
        assert not used & parent_backends, f"child {index} used the parent's sessions"
        assert len(child_sessions[index]) >= 2  # it disposed of its pool mid-run: reconnected
    for index, sessions in enumerate(child_sessions):  # children do not share sessions either
        for other in child_sessions[index + 1 :]:
            assert not sessions & other
    # The parent kept its own sessions: no reconnection, so a child never closed one of them.
    assert parent_seen <= idle_backends
    assert len(connects) == connects_before
    seen_by_server = server_view(admin, parent_backends)
    assert set(seen_by_server) == parent_backends
    assert {seen_by_server[pid][0] for pid in parent_backends - {held_backend}} == {"idle"}
    # Its open transaction is the one it began, still holding its temporary table.
    state, _, xact_start = server_view(admin, {held_backend})[held_backend]
    assert state == "idle in transaction" and xact_start is not None
    assert held.execute(text("SELECT value FROM fork_guard")).scalar_one() == 42
    assert int(held.execute(text("SELECT txid_current()")).scalar_one()) == held_xid
    held.rollback()
    held.close()


def test_a_child_checks_out_although_a_parent_thread_held_the_pool_lock_at_fork(
    engine: Engine,
) -> None:
    parent_backends = warm(engine, 2)
    queue_mutex = engine.pool._pool.mutex  # type: ignore[attr-defined]
    # As if other threads were inside a checkout and inside get_engine() at the moment of fork.
    with queue_mutex, db_engine._lock:

        def child(_: int) -> dict[str, Any]:
            with db_engine.session_scope() as session:
                backend = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            return {"backend": int(backend)}

        children = Children(child, 1)
        (result,) = children.results(timeout=30)
    assert result["backend"] not in parent_backends


def test_pool_metrics_in_a_child_count_only_the_childs_own_work(engine: Engine) -> None:
    registry = CollectorRegistry()
    instrumented = db_metrics.instrument(engine, registry)

    def value(name: str, **labels: str) -> float:
        found = registry.get_sample_value(name, {"pool": APP, **labels})
        assert found is not None, name
        return found

    warm(engine, 2)
    held = engine.connect()
    held.execute(text("SELECT 1"))
    parent_before = {
        "checked_out": value("dbops_pool_checked_out"),
        "connects": value("dbops_pool_connects_total"),
        "selects": value("dbops_query_duration_seconds_count", operation="select"),
    }
    assert parent_before["checked_out"] == 1 and parent_before["connects"] == 2
    assert parent_before["selects"] >= 3

    def child(_: int) -> dict[str, Any]:
        inherited = {
            "checked_out": value("dbops_pool_checked_out"),
            "idle": value("dbops_pool_idle"),
            "connects": value("dbops_pool_connects_total"),
            "selects": value("dbops_query_duration_seconds_count", operation="select"),
            "waits": value("dbops_pool_wait_seconds_count"),
        }
        with engine.connect() as connection:
            for _ in range(5):
                connection.execute(text("SELECT 1"))
            during = value("dbops_pool_checked_out")
        return {
            "inherited": inherited,
            "checked_out_during": during,
            "checked_out_after": value("dbops_pool_checked_out"),
            "connects": value("dbops_pool_connects_total"),
            "selects": value("dbops_query_duration_seconds_count", operation="select"),
            "waits": value("dbops_pool_wait_seconds_count"),
        }

    # As if other threads were counting a connect and timing a statement at the moment of fork.
    with instrumented._lock, instrumented.queries["select"]._lock:
        (result,) = Children(child, 1).results(timeout=30)

    # A new process starts from nothing: neither the parent's connections nor its history.
    assert result["inherited"] == {
        "checked_out": 0,
        "idle": 0,
        "connects": 0,
        "selects": 0,
        "waits": 0,
    }
    assert result["checked_out_during"] == 1 and result["checked_out_after"] == 0
    assert result["connects"] == 1
    assert result["selects"] == 5
    assert result["waits"] == 1
    # The parent's numbers are its own, untouched by the child.
    assert value("dbops_pool_checked_out") == 1
    assert value("dbops_pool_connects_total") == parent_before["connects"]
    selects = value("dbops_query_duration_seconds_count", operation="select")
    assert selects == parent_before["selects"]
    held.close()
