"""``ops db init`` as operators run it: a separate process, twice, concurrently, late servers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from db.seed.knowledge import SHIPPED_EXPORT
from tests.conftest import Server, drop_roles, env_for
from tests.conftest import run_ops as ops
from tests.pgcluster import Cluster, free_port

ROOT = Path(__file__).resolve().parents[2]
KNOWLEDGE = sum(1 for line in SHIPPED_EXPORT.read_text().splitlines() if line.strip())
SEED_ENV_PREFIXES = ("ADMIN_", "APP_DB_", "MONITOR_DB_", "BACKUP_DB_", "OPS_LOG")


def init_env(url: URL, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in env_for(url).items() if not k.startswith(SEED_ENV_PREFIXES)}
    env["ADMIN_PASSWORD_OUTPUT"] = str(tmp_path / "admin-password")
    env.update(extra)
    return env


def start_ops(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ops.cli", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def database_state(url: URL) -> dict[str, int]:
    queries = {
        "tables": "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        " AND tablename <> 'alembic_version'",
        "views": "SELECT count(*) FROM pg_views WHERE schemaname = 'public'",
        "triggers": "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '%_set_updated_at'",
        "revisions": "SELECT count(*) FROM alembic_version",
        "agents": "SELECT count(*) FROM agents",
        "admins": "SELECT count(*) FROM users WHERE role = 'admin'",
        "workflows": "SELECT count(*) FROM workflows",
        "tasks": "SELECT count(*) FROM tasks",
        "knowledge": "SELECT count(*) FROM knowledge_base",
    }
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {
                name: int(connection.execute(text(sql)).scalar_one())
                for name, sql in queries.items()
            }
    finally:
        engine.dispose()


EXPECTED = {
    "tables": 7,
    "views": 3,
    "triggers": 6,
    "revisions": 1,
    "agents": 10,
    "admins": 1,
    "workflows": 3,
    "tasks": 8,
    "knowledge": KNOWLEDGE,
}


def test_init_twice_builds_everything_then_reports_no_changes(
    empty_db: URL, tmp_path: Path
) -> None:
    env = init_env(empty_db, tmp_path, ADMIN_PASSWORD="an admin password for init")
    first = ops("db", "init", "--json", env=env)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["schema"] == {"before": None, "after": "0001"}
    assert summary["seed"]["agents"]["inserted"] == 10 and summary["changed"] > 70
    assert database_state(empty_db) == EXPECTED

    second = ops("db", "init", env=env)
    assert second.returncode == 0, second.stderr
    assert "changes: 0 (nothing to do)" in second.stdout
    assert "agents: 0 inserted, 0 updated, 10 unchanged" in second.stdout
    assert f"knowledge: 0 inserted, 0 updated, {KNOWLEDGE} unchanged" in second.stdout
    assert database_state(empty_db) == EXPECTED


def test_two_inits_at_once_make_one_schema_and_no_duplicates(empty_db: URL, tmp_path: Path) -> None:
    env = init_env(empty_db, tmp_path)
    runs = [start_ops("db", "init", "--json", env=env) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err
    changes = sorted(json.loads(out)["changed"] for out, _ in outputs)
    assert changes[0] == 0 and changes[1] > 70  # the second waited, then found it all done
    assert database_state(empty_db) == EXPECTED
    assert len((tmp_path / "admin-password").read_text().strip()) >= 24


@pytest.fixture
def role_names(empty_db: URL) -> Iterator[dict[str, str]]:
    """Role names unique to the test (roles are cluster-wide), dropped again afterwards."""
    suffix = uuid.uuid4().hex[:8]
    names = {p: f"{p.lower()}_{suffix}" for p in ("APP", "MONITOR", "BACKUP")}
    yield names
    engine = create_engine(empty_db, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            drop_roles(connection, names.values())
    finally:
        engine.dispose()


def test_passwords_never_appear_in_init_output(
    empty_db: URL, tmp_path: Path, role_names: dict[str, str]
) -> None:
    secrets = {
        f"{p}_DB_PASSWORD": f"{p.lower()}-role-secret-{uuid.uuid4().hex}" for p in role_names
    }
    env = init_env(
        empty_db,
        tmp_path,
        OPS_LOG_FORMAT="json",
        **{f"{p}_DB_USER": name for p, name in role_names.items()},
        **secrets,
    )
    generated = ops("db", "init", env=env)
    assert generated.returncode == 0, generated.stderr
    password_file = tmp_path / "admin-password"
    admin_password = password_file.read_text().strip()
    assert str(password_file) in generated.stderr  # the log says where, never what
    given_password = f"given-admin-{uuid.uuid4().hex}"
    given = ops(
        "db", "init", env={**env, "ADMIN_PASSWORD": given_password, "OPS_LOG_FORMAT": "text"}
    )
    assert given.returncode == 0, given.stderr
    assert "admin: updated" in given.stdout
    everything = generated.stdout + generated.stderr + given.stdout + given.stderr
    for secret in [admin_password, given_password, *secrets.values()]:
        assert secret not in everything
    # the roles exist and their passwords work
    for prefix, name in role_names.items():
        engine = create_engine(
            empty_db.set(username=name, password=secrets[f"{prefix}_DB_PASSWORD"])
        )
        try:
            with engine.connect() as connection:
                assert connection.execute(text("SELECT current_user")).scalar() == name
        finally:
            engine.dispose()


def test_init_gives_up_on_an_absent_server_with_a_clear_message(tmp_path: Path) -> None:
    url = URL.create("postgresql", "dbops", "wait-secret-pw", "127.0.0.1", free_port(), "dbops")
    started = time.monotonic()
    result = ops("db", "init", env=init_env(url, tmp_path, DB_WAIT_TIMEOUT="1s"))
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    assert "not reachable within 1s" in result.stderr and "DB_WAIT_TIMEOUT" in result.stderr
    assert "wait-secret-pw" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_init_waits_for_a_server_that_starts_late(tmp_path: Path) -> None:
    cluster = Cluster()  # its port is chosen, nothing listens there yet
    try:
        env = init_env(cluster.url("postgres"), tmp_path, DB_WAIT_TIMEOUT="90s")
        run = start_ops("db", "init", env=env)
        time.sleep(1.0)
        assert run.poll() is None  # still waiting
        cluster.start()
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        assert "waiting up to 90s" in err and "changes:" in out
    finally:
        cluster.stop()


def test_invalid_configuration_exits_2_before_connecting(tmp_path: Path) -> None:
    url = URL.create("postgresql", "dbops", None, "127.0.0.1", free_port(), "dbops")
    result = ops(
        "db", "init", env=init_env(url, tmp_path, DB_POOL_SIZE="-1", DB_WAIT_TIMEOUT="60s")
    )
    assert result.returncode == 2
    assert "DB_POOL_SIZE -1: must be >= 1" in result.stderr
    assert "not reachable" not in result.stderr


def test_init_fails_fast_on_a_wrong_password(pg: Server, tmp_path: Path) -> None:
    if pg.cluster is None:
        pytest.skip("needs the suite's own cluster, whose TCP logins require a password")
    url = pg.admin_url.set(password="not-the-password")
    started = time.monotonic()
    result = ops("db", "init", env=init_env(url, tmp_path, DB_WAIT_TIMEOUT="60s"))
    assert result.returncode == 1
    assert "refused the login" in result.stderr
    assert time.monotonic() - started < 30
