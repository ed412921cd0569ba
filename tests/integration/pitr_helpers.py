"""Shared by the PITR integration tests: a cluster of their own, Barman, the CLI.

PITR tests stream and switch WAL, take base backups of the whole cluster and kill servers,
so they get a cluster of their own rather than the session's shared one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from ops.settings import Settings, load_settings
from tests.conftest import env_for, run_ops
from tests.pgcluster import Cluster

REPO = Path(__file__).resolve().parents[2]
# Streaming needs replication (wal_level, senders, slots: PostgreSQL's defaults, stated so a
# change of default cannot silently break us) and a cap on what a slot may hold back.
PITR_SERVER_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "max_slot_wal_keep_size": "256MB",
    "full_page_writes": "on",
}


def barman_program() -> Path:
    """Barman from its own virtualenv (``make venv`` builds it), else from PATH."""
    for candidate in (os.environ.get("DBOPS_TEST_BARMAN"), str(REPO / ".venv-barman/bin/barman")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    found = shutil.which("barman")
    if found is None:
        raise RuntimeError("barman is not installed: run `make venv` (it builds .venv-barman)")
    return Path(found)


def start_pitr_cluster(**extra: str) -> Cluster:
    return Cluster({**PITR_SERVER_SETTINGS, **extra}).start()


BACKUP_ROLE = "pitr_backup"


def backup_role_url(cluster: Cluster) -> URL:
    """The backup role as ``ops db init`` makes it (not a superuser) on ``cluster``."""
    from db.roles import RoleSpec, ensure_roles

    password = "backup-role-secret-" + cluster.password[:8]
    engine = create_engine(cluster.url())
    try:
        with engine.begin() as connection:
            ensure_roles(connection, [RoleSpec("backup", BACKUP_ROLE, password, "BACKUP")])
    finally:
        engine.dispose()
    return cluster.url(user=BACKUP_ROLE, password=password)


def pitr_env(
    cluster: Cluster, directory: Path, url: URL | None = None, **extra: str
) -> dict[str, str]:
    return env_for(
        url or cluster.url(),
        PITR_ENABLED="true",
        PITR_DIR=str(directory),
        PITR_BARMAN=str(barman_program()),
        PG_BINDIR=str(cluster.bindir),
        BACKUP_DIR=str(directory / "dumps"),
        **extra,
    )


def pitr_settings(env: dict[str, str]) -> Settings:
    keys = ("DATABASE_URL", "PITR_", "PG_BINDIR", "BACKUP_DIR")
    return load_settings({k: v for k, v in env.items() if k.startswith(keys)})


def ops_json(*args: str, env: dict[str, str], expect: int = 0) -> Any:
    import json

    result = run_ops(*args, "--json", env=env)
    assert result.returncode == expect, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


def execute(url: URL, sql: str, **params: object) -> Any:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            result = connection.execute(text(sql), params)
            return result.all() if result.returns_rows else None
    finally:
        engine.dispose()


class Sidecar:
    """``ops serve`` as a process, as the serve tests run it; stopped with SIGTERM."""

    def __init__(self, env: dict[str, str]) -> None:
        import subprocess
        import sys

        self.port = int(env["OPS_LISTEN"].rsplit(":", 1)[1])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "serve"],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def metric(self, line_start: str) -> float | None:
        from tests.integration.test_backup_serve import metric

        return metric(self.port, line_start)

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then the exit code and the tail of what it logged."""
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, stderr = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        return self.process.returncode, stderr[-3000:]


class Writer:
    """Commits one row at a steady rate on a connection of its own, noting for each commit the
    id, when the server acknowledged it and the WAL position just after it. Bounded: it stops
    after ``limit`` seconds or on the first error (a killed server), whichever comes first."""

    def __init__(self, url: URL, interval: float = 0.02, limit: float = 240.0) -> None:
        import threading

        self.url = url
        self.interval = interval
        self.limit = limit
        self.attempted = 0  # ids 1..attempted were sent (the last may not have committed)
        self.acknowledged: list[tuple[int, float, str]] = []  # (id, acked at, LSN after)
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pitr-writer", daemon=True)

    def start(self) -> Writer:
        self._thread.start()
        return self

    def _run(self) -> None:
        import time

        import psycopg2

        url = self.url
        connection = psycopg2.connect(
            host=url.host, port=url.port, user=url.username, password=url.password,
            dbname=url.database, connect_timeout=5,
        )  # fmt: skip
        started = time.monotonic()
        try:
            with connection.cursor() as cursor:
                while not self._stop.is_set() and time.monotonic() - started < self.limit:
                    self.attempted += 1
                    cursor.execute(
                        "INSERT INTO ledger (id, pad) VALUES (%s, repeat('x', 200))",
                        (self.attempted,),
                    )
                    connection.commit()
                    acked = time.time()
                    cursor.execute("SELECT pg_current_wal_insert_lsn()::text")
                    lsn = cursor.fetchone()[0]  # type: ignore[index]
                    connection.commit()
                    self.acknowledged.append((self.attempted, acked, lsn))
                    self._stop.wait(self.interval)
        except psycopg2.Error as error:
            self.error = str(error).strip().splitlines()[0] if str(error).strip() else "error"
        finally:
            with contextlib.suppress(psycopg2.Error):
                connection.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
