"""Shared fixtures: a real PostgreSQL for every test that touches SQL, never a mock.

``DATABASE_URL`` (a role allowed to create databases) is used when set; otherwise the session
starts its own throwaway cluster. Each test gets a database of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Connection, Engine, make_url

from tests.pgcluster import Cluster
from tests.sentinels import snapshot

TEMPLATE_DB = "dbops_test_template"
REPO = Path(__file__).resolve().parents[1]


class Server:
    """Where the tests' PostgreSQL is and how to make databases on it."""

    def __init__(self, admin_url: URL, cluster: Cluster | None) -> None:
        self.admin_url = admin_url
        self.cluster = cluster
        self._template_ready = False

    def url(self, database: str) -> URL:
        return self.admin_url.set(database=database)

    def admin_engine(self) -> Engine:
        return create_engine(self.admin_url, isolation_level="AUTOCOMMIT")

    def execute(self, sql: str, database: str | None = None) -> None:
        engine = create_engine(
            self.url(database) if database else self.admin_url, isolation_level="AUTOCOMMIT"
        )
        try:
            with engine.connect() as connection:
                connection.execute(text(sql))
        finally:
            engine.dispose()

    def create_database(self, template: str = "template0") -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def migrated_template(self) -> str:
        """A database at the head revision, made once, copied for each test that needs one."""
        if not self._template_ready:
            from db.migrate import upgrade

            self.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
            self.execute(f'CREATE DATABASE "{TEMPLATE_DB}" TEMPLATE template0')
            engine = create_engine(self.url(TEMPLATE_DB))
            try:
                upgrade(engine)
            finally:
                engine.dispose()
            self._template_ready = True
        return TEMPLATE_DB


@pytest.fixture(scope="session")
def pg() -> Iterator[Server]:
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield Server(make_url(configured).set(drivername="postgresql+psycopg2"), None)
        return
    cluster = Cluster().start()
    try:
        yield Server(cluster.url(), cluster)
    finally:
        cluster.stop()


@pytest.fixture
def empty_db(pg: Server) -> Iterator[URL]:
    """A new, empty database (no schema) that is dropped after the test."""
    name = pg.create_database()
    try:
        yield pg.url(name)
    finally:
        pg.drop_database(name)


@pytest.fixture
def migrated_db(pg: Server) -> Iterator[URL]:
    """A new database at the head revision, dropped after the test."""
    name = pg.create_database(template=pg.migrated_template())
    try:
        yield pg.url(name)
    finally:
        pg.drop_database(name)


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """Files and a directory beside the backup directory that nothing may touch."""
    victim = tmp_path / "outside"
    (victim / "tree").mkdir(parents=True)
    (victim / "secret.dump").write_bytes(b"precious bytes\n")
    (victim / "tree" / "toc.dat").write_bytes(b"more precious bytes\n")
    (victim / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    before = snapshot(victim)
    yield victim
    assert snapshot(victim) == before, "something outside BACKUP_DIR changed"


@pytest.fixture
def backups(tmp_path: Path) -> Path:
    """An empty backup directory of the test's own."""
    directory = tmp_path / "backups"
    directory.mkdir()
    return directory


@pytest.fixture
def engine_for() -> Iterator[object]:
    """Build engines for URLs and dispose of them all after the test."""
    engines: list[Engine] = []

    def make(url: URL, **kwargs: object) -> Engine:
        engine = create_engine(url, **kwargs)  # type: ignore[arg-type]
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def env_for(url: URL, **extra: str) -> dict[str, str]:
    """A process environment that points ``db`` at ``url`` and nothing else of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "DB_", "PG"))}
    env.pop("DATABASE_URL", None)
    env["DATABASE_URL"] = url.render_as_string(hide_password=False)
    env.update(extra)
    return env


def run_ops(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``ops ARGS`` as a separate process, the way an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def drop_roles(connection: Connection, names: Iterable[str]) -> None:
    """Drop the roles of ``names`` that exist, and what they own (roles are cluster-wide)."""
    existing = (
        connection.execute(
            text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)"),
            {"names": list(names)},
        )
        .scalars()
        .all()
    )
    if existing:
        quoted = ", ".join(f'"{name}"' for name in existing)
        connection.execute(text(f"DROP OWNED BY {quoted}"))
        connection.execute(text(f"DROP ROLE {quoted}"))
