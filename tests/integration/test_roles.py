"""The service roles on a real server: what each can and cannot do, and idempotent upkeep."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import OperationalError, ProgrammingError

from db.roles import RoleSpec, ensure_roles, role_specs, scram_matches, scram_verifier
from db.seed.settings import SeedSettings
from tests.conftest import drop_roles

MakeEngine = Callable[..., Engine]


@pytest.fixture
def admin(migrated_db: URL, engine_for: MakeEngine) -> Engine:
    engine = engine_for(migrated_db)
    with engine.connect() as connection:
        if not connection.execute(
            text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        ).scalar():
            pytest.skip("role tests need a superuser DATABASE_URL")
    return engine


@pytest.fixture
def specs(admin: Engine) -> Iterator[list[RoleSpec]]:
    """Three roles with names unique to the test (roles are cluster-wide), dropped afterwards."""
    suffix = uuid.uuid4().hex[:8]
    settings = SeedSettings(
        app_db_user=f"app_{suffix}",
        app_db_password=f"app-secret-{suffix}",
        monitor_db_user=f"mon_{suffix}",
        monitor_db_password=f"mon-secret-{suffix}",
        backup_db_user=f"bak_{suffix}",
        backup_db_password=f"bak-secret-{suffix}",
    )
    made = role_specs(settings)
    yield made
    with admin.begin() as connection:
        drop_roles(connection, [spec.name for spec in made])


def ensure(admin: Engine, specs: list[RoleSpec]) -> dict[str, list[str]]:
    with admin.begin() as connection:
        return {result.kind: result.changes for result in ensure_roles(connection, specs)}


@pytest.fixture
def as_role(migrated_db: URL) -> Iterator[Callable[[RoleSpec], Engine]]:
    engines: list[Engine] = []

    def connect(spec: RoleSpec) -> Engine:
        engine = create_engine(
            migrated_db.set(username=spec.name, password=spec.password),
            isolation_level="AUTOCOMMIT",
        )
        engines.append(engine)
        return engine

    yield connect
    for engine in engines:
        engine.dispose()


def allowed(engine: Engine, sql: str) -> bool:
    try:
        with engine.connect() as connection:
            connection.execute(text(sql))
        return True
    except ProgrammingError as error:
        assert "permission denied" in str(error) or "must be owner" in str(error), error
        return False


def test_first_run_creates_every_role_and_second_run_changes_nothing(
    admin: Engine, specs: list[RoleSpec]
) -> None:
    first = ensure(admin, specs)
    assert all(changes[0] == "created" for changes in first.values())
    assert "pg_monitor" in first["monitor"] and "pg_read_all_data" in first["backup"]
    assert any(c == "default privileges on tables" for c in first["app"])
    second = ensure(admin, specs)
    assert second == {"app": [], "monitor": [], "backup": []}


def test_app_role_does_dml_but_no_ddl(
    admin: Engine, specs: list[RoleSpec], as_role: Callable[[RoleSpec], Engine]
) -> None:
    ensure(admin, specs)
    app = as_role(specs[0])
    assert allowed(app, "INSERT INTO agents (name, role) VALUES ('by-app', 'r')")
    assert allowed(app, "UPDATE agents SET description = 'x' WHERE name = 'by-app'")
    assert allowed(app, "SELECT * FROM agent_workload")
    assert allowed(app, "DELETE FROM agents WHERE name = 'by-app'")
    assert not allowed(app, "CREATE TABLE app_owned (id int)")
    assert not allowed(app, "DROP TABLE metrics")
    assert not allowed(app, "ALTER TABLE agents ADD COLUMN x int")
    assert allowed(app, "SELECT version_num FROM alembic_version")
    assert not allowed(app, "UPDATE alembic_version SET version_num = 'x'")
    # a table a later migration creates is covered by the default privileges
    with admin.begin() as connection:
        connection.execute(text("CREATE TABLE later_table (id int)"))
    assert allowed(app, "INSERT INTO later_table VALUES (1)")


def test_monitor_role_sees_all_activity_but_no_table_data(
    admin: Engine, specs: list[RoleSpec], as_role: Callable[[RoleSpec], Engine]
) -> None:
    ensure(admin, specs)
    monitor = as_role(specs[1])
    with admin.connect() as other:
        other.execute(text("SELECT 'marker-for-monitor'"))
        other_pid = other.execute(text("SELECT pg_backend_pid()")).scalar()
        with monitor.connect() as connection:
            query = connection.execute(
                text("SELECT query FROM pg_stat_activity WHERE pid = :pid"), {"pid": other_pid}
            ).scalar()
    assert query == "SELECT pg_backend_pid()"  # the real text, not <insufficient privilege>
    assert allowed(monitor, "SELECT count(*) FROM pg_stat_database")
    assert not allowed(monitor, "SELECT * FROM agents")
    assert not allowed(monitor, "SELECT * FROM users")


def test_backup_role_reads_every_table_and_writes_none(
    admin: Engine, specs: list[RoleSpec], as_role: Callable[[RoleSpec], Engine]
) -> None:
    ensure(admin, specs)
    with admin.begin() as connection:
        connection.execute(text("CREATE TABLE later_table (id int)"))
    backup = as_role(specs[2])
    for table in (
        "agents",
        "users",
        "sessions",
        "knowledge_base",
        "later_table",
        "alembic_version",
    ):
        assert allowed(backup, f"SELECT * FROM {table}"), table
    assert not allowed(backup, "INSERT INTO agents (name, role) VALUES ('by-backup', 'r')")
    with backup.connect() as connection:
        assert connection.execute(
            text("SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user")
        ).scalar()


def test_changed_password_and_attributes_are_put_right(
    admin: Engine, specs: list[RoleSpec], as_role: Callable[[RoleSpec], Engine]
) -> None:
    ensure(admin, specs)
    app = specs[0]
    with admin.begin() as connection:
        connection.execute(text(f'ALTER ROLE "{app.name}" CREATEDB'))
    rotated = replace(app, password="a-rotated-app-password")
    changes = ensure(admin, [rotated, *specs[1:]])
    assert changes["app"] == ["attributes", "password"]
    with as_role(rotated).connect() as connection:
        assert connection.execute(text("SELECT current_user")).scalar() == app.name
    with pytest.raises(OperationalError, match="password authentication failed"):
        as_role(app).connect().close()


def test_roles_without_password_are_skipped(admin: Engine, specs: list[RoleSpec]) -> None:
    unset = [replace(spec, password=None) for spec in specs]
    with admin.begin() as connection:
        results = ensure_roles(connection, unset)
        assert [r.skipped for r in results] == [
            "APP_DB_PASSWORD not set",
            "MONITOR_DB_PASSWORD not set",
            "BACKUP_DB_PASSWORD not set",
        ]
        assert not connection.execute(
            text("SELECT count(*) FROM pg_roles WHERE rolname = ANY(:names)"),
            {"names": [s.name for s in specs]},
        ).scalar()


def test_passwords_reach_the_server_only_as_scram_verifiers(
    admin: Engine, specs: list[RoleSpec]
) -> None:
    with admin.begin() as connection:
        if not connection.execute(
            text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_stat_statements'")
        ).scalar():
            pytest.skip("pg_stat_statements is not available")
        connection.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT pg_stat_statements_reset()"))
            connection.commit()
    except ProgrammingError:
        pytest.skip("pg_stat_statements is not preloaded")
    ensure(admin, specs)
    ensure(admin, [replace(specs[0], password="a-rotated-app-password"), *specs[1:]])
    with admin.connect() as connection:
        statements = (
            connection.execute(
                text("SELECT query FROM pg_stat_statements WHERE query ~* '(CREATE|ALTER) ROLE'")
            )
            .scalars()
            .all()
        )
        stored = connection.execute(
            text("SELECT rolpassword FROM pg_authid WHERE rolname = :name"), {"name": specs[1].name}
        ).scalar()
    assert len(statements) >= 4
    for statement in statements:
        for secret in [spec.password for spec in specs] + ["a-rotated-app-password"]:
            assert secret not in statement
    assert str(stored).startswith("SCRAM-SHA-256$")


def test_scram_check_matches_libpq_verifiers(admin: Engine) -> None:
    with admin.connect() as connection:
        verifier = scram_verifier(connection, "someone", "the right password")
    assert verifier.startswith("SCRAM-SHA-256$4096:")
    assert scram_matches(verifier, "the right password")
    assert not scram_matches(verifier, "the wrong password")
    assert not scram_matches("md5" + "0" * 32, "the right password")
    assert not scram_matches(None, "the right password")


def test_create_on_public_schema_is_taken_back_from_everyone(
    admin: Engine, specs: list[RoleSpec], as_role: Callable[[RoleSpec], Engine]
) -> None:
    """Servers before 15 let every role create objects in ``public``; the app must not."""
    with admin.begin() as connection:
        connection.execute(text("GRANT CREATE ON SCHEMA public TO PUBLIC"))
    with admin.begin() as connection:
        results = ensure_roles(connection, specs)
    assert [r.changes for r in results if r.kind == "schema"] == [
        ["revoked CREATE on schema public from PUBLIC"]
    ]
    assert not allowed(as_role(specs[0]), "CREATE TABLE app_owned (id int)")
    assert "schema" not in ensure(admin, specs)


def test_backup_role_may_stream_and_control_backups_but_is_no_superuser(
    admin: Engine, specs: list[RoleSpec], as_role: Callable[[RoleSpec], Engine]
) -> None:
    """What Barman checks for a non-superuser (``has_backup_privileges``), granted once."""
    first = ensure(admin, specs)
    assert any(change.startswith("execute on pg_backup_start") for change in first["backup"])
    with as_role(specs[2]).connect() as connection:
        row = connection.execute(
            text(
                "SELECT rolreplication, rolsuper,"
                " pg_has_role(current_user, 'pg_checkpoint', 'USAGE'),"
                " pg_has_role(current_user, 'pg_read_all_settings', 'USAGE'),"
                " has_function_privilege('pg_backup_start(text, boolean)', 'EXECUTE'),"
                " has_function_privilege('pg_backup_stop(boolean)', 'EXECUTE'),"
                " has_function_privilege('pg_switch_wal()', 'EXECUTE'),"
                " has_function_privilege('pg_create_restore_point(text)', 'EXECUTE')"
                " FROM pg_roles WHERE rolname = current_user"
            )
        ).one()
    assert tuple(row) == (True, False, True, True, True, True, True, True)
    for spec in specs[:2]:  # the app and monitor roles get none of it
        with as_role(spec).connect() as connection:
            assert not connection.execute(
                text("SELECT rolreplication FROM pg_roles WHERE rolname = current_user")
            ).scalar()
    assert ensure(admin, specs)["backup"] == []
