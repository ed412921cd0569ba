"""``ops db init``: wait for the server, then migrate, manage roles and seed under one lock.

Several init containers may start together against one database. Each waits (bounded) for the
server to accept connections, then takes the migration advisory lock and holds it for the whole
upgrade + roles + seed, so the second one finds everything in place and reports no changes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import exc, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from db import migrate
from db.errors import error_line
from db.pgurl import sqlalchemy_url
from db.roles import RoleResult, ensure_roles, role_specs
from db.seed.knowledge import SHIPPED_EXPORT
from db.seed.run import SeedReport, seed
from db.seed.settings import SeedSettings
from db.settings import DbSettings

log = logging.getLogger(__name__)


class ServerUnavailable(Exception):
    """The server did not accept a connection within the wait timeout."""


def wait_for_server(settings: DbSettings, timeout: float) -> float:
    """Connect until the server answers or ``timeout`` passes; returns the seconds waited."""
    started = time.monotonic()
    deadline = started + timeout
    attempt_timeout = max(1, min(settings.connect_timeout, math.ceil(timeout) or 1))
    probe = sa_create_engine(
        sqlalchemy_url(settings.url),
        poolclass=NullPool,
        connect_args={
            "application_name": settings.application_name,
            "connect_timeout": attempt_timeout,
        },
    )
    delay, last_error, attempts = 0.25, "", 0
    try:
        while True:
            attempts += 1
            try:
                with probe.connect() as connection:
                    connection.execute(text("SELECT 1"))
                waited = time.monotonic() - started
                if attempts > 1:
                    log.info("database answered after %.1fs (%d attempts)", waited, attempts)
                return waited
            except exc.DBAPIError as error:
                last_error = error_line(error)
                if "password authentication failed" in last_error:
                    # A wrong password does not fix itself; say so now, not after the timeout.
                    raise ServerUnavailable(
                        f"database {settings.redacted_url} refused the login: {last_error}"
                    ) from None
            if time.monotonic() + delay > deadline:
                raise ServerUnavailable(
                    f"database {settings.redacted_url} not reachable within {timeout:g}s "
                    f"({attempts} attempts; DB_WAIT_TIMEOUT): {last_error}"
                )
            if attempts == 1:
                log.info("waiting up to %gs for %s: %s", timeout, settings.redacted_url, last_error)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    finally:
        probe.dispose()


@dataclass(frozen=True)
class InitReport:
    schema_before: str | None
    schema_after: str | None
    roles: list[RoleResult]
    seed: SeedReport

    @property
    def changed(self) -> int:
        schema = int(self.schema_before != self.schema_after)
        return schema + sum(role.changed for role in self.roles) + self.seed.changed

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": {"before": self.schema_before, "after": self.schema_after},
            "roles": [role.as_dict() for role in self.roles],
            "seed": self.seed.as_dict(),
            "changed": self.changed,
        }

    def lines(self) -> list[str]:
        if self.schema_before == self.schema_after:
            schema = f"schema: at {self.schema_after} (unchanged)"
        else:
            schema = f"schema: {self.schema_before or 'empty'} -> {self.schema_after}"
        return [
            schema,
            *(f"role {role}" for role in self.roles),
            *self.seed.lines(),
            f"changes: {self.changed}" if self.changed else "changes: 0 (nothing to do)",
        ]


def initialize(
    engine: Engine,
    db_settings: DbSettings,
    seed_settings: SeedSettings,
    knowledge_file: Path = SHIPPED_EXPORT,
) -> InitReport:
    """Wait, lock, upgrade to head, ensure roles, seed; everything but the wait under the lock."""
    wait_for_server(db_settings, seed_settings.wait_timeout)
    with migrate.migration_lock(engine):
        before, after = migrate.upgrade(engine)
        with engine.begin() as connection:
            roles = ensure_roles(connection, role_specs(seed_settings))
        seeded = seed(engine, seed_settings, knowledge_file)
    return InitReport(before, after, roles, seeded)
