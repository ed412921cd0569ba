"""The pooled engine against a real server: transactions, health, pool numbers, fork safety."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import URL, Engine

from db import engine as db_engine
from db.models import Agent
from db.settings import DbSettings, load_db_settings
from tests.pgcluster import free_port


def settings_for(url: URL, **environ: str) -> DbSettings:
    return load_db_settings({"DATABASE_URL": url.render_as_string(hide_password=False), **environ})


@pytest.fixture
def engine(migrated_db: URL) -> Iterator[Engine]:
    built = db_engine.create_engine(
        settings_for(
            migrated_db, DB_POOL_SIZE="3", DB_MAX_OVERFLOW="2", DB_APPLICATION_NAME="t-eng"
        )
    )
    yield built
    db_engine.dispose()
    built.dispose()


def agent_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(Agent)).scalar_one())


def test_session_scope_commits_when_the_block_succeeds(engine: Engine) -> None:
    with db_engine.session_scope(engine) as session:
        session.add(Agent(name="scoped", role="test"))
    assert agent_count(engine) == 1


def test_session_scope_rolls_back_when_the_block_raises(engine: Engine) -> None:
    with pytest.raises(RuntimeError, match="boom"), db_engine.session_scope(engine) as session:
        session.add(Agent(name="doomed", role="test"))
        session.flush()  # the row reached the server inside the transaction
        raise RuntimeError("boom")
    assert agent_count(engine) == 0


def test_session_scope_without_engine_uses_the_configured_one(engine: Engine) -> None:
    db_engine.configure(engine)
    with db_engine.session_scope() as session:
        session.add(Agent(name="default-engine", role="test"))
    assert db_engine.get_engine() is engine
    assert agent_count(engine) == 1


def test_health_check_reports_version_database_and_latency(
    engine: Engine, migrated_db: URL
) -> None:
    health = db_engine.health_check(engine)
    assert health.ok and health.error is None
    assert health.database == migrated_db.database
    assert health.server_version and health.server_version.split(".")[0].isdigit()
    assert 0 < health.latency_seconds < 30


def test_health_check_reports_a_dead_server_as_a_failure(migrated_db: URL) -> None:
    dead = db_engine.create_engine(
        settings_for(migrated_db.set(port=free_port()), DB_CONNECT_TIMEOUT="2")
    )
    try:
        health = db_engine.health_check(dead)
    finally:
        dead.dispose()
    assert not health.ok
    assert health.server_version is None and health.error
    assert "refused" in health.error or "could not connect" in health.error
    assert migrated_db.password is None or migrated_db.password not in health.error


def test_pool_status_counts_checked_out_overflow_and_idle(engine: Engine) -> None:
    assert db_engine.pool_status(engine).as_dict() == {
        "size": 3,
        "max_overflow": 2,
        "checked_out": 0,
        "overflow": 0,
        "idle": 0,
    }
    held = [engine.connect() for _ in range(4)]
    for connection in held:
        connection.execute(text("SELECT 1"))
    busy = db_engine.pool_status(engine)
    assert (busy.checked_out, busy.overflow, busy.idle) == (4, 1, 0)
    for connection in held:
        connection.close()
    after = db_engine.pool_status(engine)
    assert (after.checked_out, after.overflow, after.idle) == (0, 0, 3)


def test_connections_carry_the_application_name(engine: Engine) -> None:
    with engine.connect() as connection:
        name = connection.execute(
            text("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        ).scalar_one()
    assert name == "t-eng"


def backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def run_in_child(work: Callable[[], int]) -> int:
    """Run ``work`` in a forked child and return the integer it produced."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.write(write_end, str(work()).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        produced = pipe.read()
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 0, "child failed"
    return int(produced)


def test_checkout_after_fork_opens_a_new_connection_and_spares_the_parents(
    engine: Engine,
) -> None:
    parent_backend = backend_pid(engine)  # now idle in the pool, inherited by the child
    child_backend = run_in_child(lambda: backend_pid(engine))
    assert child_backend != parent_backend
    assert backend_pid(engine) == parent_backend  # the parent's session survived the child
