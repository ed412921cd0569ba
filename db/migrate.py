"""Alembic, driven from code, serialized across processes by an advisory lock.

Two init containers that start together must not both run the initial revision. Each takes a
PostgreSQL advisory lock on a connection of its own before migrating; the second waits, then
finds the schema at head and does nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# pg_advisory_lock key: the bytes of "dbops-mg" as a signed 64-bit integer
MIGRATION_LOCK_KEY = int.from_bytes(b"dbops-mg", "big", signed=True)

# Databases whose migration lock this thread already holds. ``ops db init`` holds the lock for
# the whole of upgrade + roles + seed; the upgrade inside must not wait for its own caller.
_held = threading.local()


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _lock_target(engine: Engine) -> tuple[str | None, int | None, str | None]:
    url = engine.url
    return (url.host, url.port, url.database)


@contextmanager
def migration_lock(engine: Engine, timeout: float = 300.0) -> Iterator[None]:
    """Hold the migration advisory lock on a dedicated connection for the block's duration.

    Re-entrant within a thread: a nested block for the same database runs under the outer lock.
    """
    held: set[tuple[str | None, int | None, str | None]] = _held.__dict__.setdefault("db", set())
    target = _lock_target(engine)
    if target in held:
        yield
        return
    started = time.monotonic()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as lock_connection:
        while not lock_connection.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
        ).scalar():
            if time.monotonic() - started > timeout:
                raise TimeoutError(
                    f"migration lock still held by another process after {timeout:g}s"
                )
            if time.monotonic() - started < 0.3:
                log.info("waiting for another process to finish migrating")
            time.sleep(0.2)
        held.add(target)
        try:
            yield
        finally:
            held.discard(target)
            lock_connection.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )


def _run(engine: Engine, action: str, revision: str) -> tuple[str | None, str | None]:
    with migration_lock(engine):
        before = current_revision(engine)
        with engine.begin() as connection:
            config = alembic_config(connection)
            getattr(command, action)(config, revision)
        after = current_revision(engine)
    if before != after:
        log.info("schema %s: %s -> %s", action, before or "empty", after or "empty")
    else:
        log.info("schema already at %s; nothing to %s", after or "base", action)
    return before, after


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade to ``revision``; returns the revisions before and after."""
    return _run(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str) -> tuple[str | None, str | None]:
    """Downgrade to ``revision`` (``base`` drops everything the migrations made)."""
    return _run(engine, "downgrade", revision)


def check(engine: Engine) -> list[str]:
    """Problems with the schema: not at head, or models that differ from the database."""
    from alembic.autogenerate import compare_metadata

    from db.models import Base

    problems = []
    current, head = current_revision(engine), head_revision()
    if current != head:
        problems.append(f"schema at {current or 'no revision'}, head is {head}")
        return problems
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": False}
        )
        for diff in compare_metadata(context, Base.metadata):
            problems.append(f"models differ from the database: {diff}")
    return problems
