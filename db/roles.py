"""The login roles the other services use, created and kept in shape by ``ops db init``.

- app (``APP_DB_USER``): DML on the platform's tables, SELECT on its views and on
  ``alembic_version``, nothing else; the tables created by later migrations are covered
  through ``ALTER DEFAULT PRIVILEGES``.
- monitor (``MONITOR_DB_USER``): ``pg_monitor`` and CONNECT; it sees every session and
  statistics view but no table data.
- backup (``BACKUP_DB_USER``): ``pg_read_all_data`` (SELECT on every table when the server
  predates it), ``pg_monitor``, and CREATEDB for restore drills; for point-in-time recovery
  (Barman streaming through a slot, pg_basebackup) REPLICATION, ``pg_checkpoint`` and EXECUTE
  on the backup and WAL control functions, but not superuser.

A role is only managed when its password is configured. Passwords never travel as SQL text:
the SCRAM-SHA-256 verifier is computed client-side by libpq and only the verifier is sent, so
neither the server log nor ``pg_stat_statements`` can show a password. Every step checks the
catalog first and acts only on a difference, so a second run reports no changes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, cast

from psycopg2.extensions import connection as psycopg2_connection
from psycopg2.extensions import encrypt_password
from sqlalchemy import text
from sqlalchemy.engine import Connection

from db.seed.settings import SeedSettings

log = logging.getLogger(__name__)

SCHEMA = "public"
APP_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
READ_PRIVILEGES = ("SELECT",)
SEQUENCE_PRIVILEGES = ("USAGE", "SELECT")
# What Barman checks a non-superuser backup role for (pg_read_all_settings/_stats come with
# pg_monitor), by server version: the backup control functions were renamed in 15.
BACKUP_FUNCTIONS = {
    15: ("pg_backup_start(text, boolean)", "pg_backup_stop(boolean)"),
    10: (
        "pg_start_backup(text, boolean, boolean)",
        "pg_stop_backup()",
        "pg_stop_backup(boolean, boolean)",
    ),
}
WAL_FUNCTIONS = ("pg_switch_wal()", "pg_create_restore_point(text)")
# Migration bookkeeping is the migrating role's alone.
PRIVATE_TABLES = ("alembic_version",)
_VERIFIER = re.compile(
    r"^SCRAM-SHA-256\$(?P<iterations>\d+):(?P<salt>[A-Za-z0-9+/=]+)"
    r"\$(?P<stored>[A-Za-z0-9+/=]+):(?P<server>[A-Za-z0-9+/=]+)$"
)


@dataclass(frozen=True)
class RoleSpec:
    kind: str  # app | monitor | backup
    name: str
    password: str | None = field(repr=False)
    env_prefix: str

    @property
    def createdb(self) -> bool:
        return self.kind == "backup"

    @property
    def replication(self) -> bool:
        return self.kind == "backup"


@dataclass
class RoleResult:
    kind: str
    name: str
    changes: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def changed(self) -> int:
        return len(self.changes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "changes": self.changes,
            "skipped": self.skipped,
        }

    def __str__(self) -> str:
        if self.skipped:
            return f"{self.name}: skipped ({self.skipped})"
        return f"{self.name}: {', '.join(self.changes) if self.changes else 'unchanged'}"


def role_specs(settings: SeedSettings) -> list[RoleSpec]:
    return [
        RoleSpec("app", settings.app_db_user, settings.app_db_password, "APP"),
        RoleSpec("monitor", settings.monitor_db_user, settings.monitor_db_password, "MONITOR"),
        RoleSpec("backup", settings.backup_db_user, settings.backup_db_password, "BACKUP"),
    ]


def scram_verifier(connection: Connection, name: str, password: str) -> str:
    """The SCRAM-SHA-256 verifier libpq computes for ``password``, with a fresh salt."""
    raw = cast("psycopg2_connection", connection.connection.dbapi_connection)
    return str(encrypt_password(password, name, raw, "scram-sha-256"))


def scram_matches(verifier: str | None, password: str) -> bool:
    """Whether a stored SCRAM-SHA-256 verifier was made from ``password`` (RFC 5802/7677)."""
    match = _VERIFIER.match(verifier or "")
    if not match:
        return False
    # libpq applies SASLprep; NFKC covers what it changes in ordinary passwords.
    prepared = password if password.isascii() else unicodedata.normalize("NFKC", password)
    salted = hashlib.pbkdf2_hmac(
        "sha256",
        prepared.encode(),
        base64.b64decode(match["salt"]),
        int(match["iterations"]),
    )
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return hmac.compare_digest(
        hashlib.sha256(client_key).digest(), base64.b64decode(match["stored"])
    ) and hmac.compare_digest(server_key, base64.b64decode(match["server"]))


class _Roles:
    """One pass over the configured roles on one connection (inside the caller's transaction)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.quote = connection.dialect.identifier_preparer.quote_identifier
        self.is_superuser = bool(
            self._scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        )
        self.database = str(self._scalar("SELECT current_database()"))
        self.server_version = int(self._scalar("SHOW server_version_num"))

    def _scalar(self, sql: str, **params: Any) -> Any:
        return self.connection.execute(text(sql), params).scalar()

    def _run(self, sql: str, **params: Any) -> None:
        self.connection.execute(text(sql), params)

    def ensure(self, spec: RoleSpec) -> RoleResult:
        result = RoleResult(spec.kind, spec.name)
        if spec.password is None:
            result.skipped = f"{spec.env_prefix}_DB_PASSWORD not set"
            return result
        self._role(spec, result)
        self._connect(spec, result)
        if spec.kind == "app":
            self._app(spec, result)
        elif spec.kind == "monitor":
            self._member(spec, "pg_monitor", result)
        else:
            self._backup(spec, result)
        return result

    def _role(self, spec: RoleSpec, result: RoleResult) -> None:
        assert spec.password is not None
        role = self.quote(spec.name)
        createdb = "CREATEDB" if spec.createdb else "NOCREATEDB"
        # Only a superuser may give REPLICATION; without one it is left as it is, and said.
        replication = spec.replication and self.is_superuser
        if spec.replication and not self.is_superuser:
            log.warning("not a superuser: cannot give %s REPLICATION (needed for PITR)", spec.name)
        keyword = "REPLICATION" if replication else "NOREPLICATION"
        attributes = f"LOGIN NOSUPERUSER NOCREATEROLE {keyword} NOBYPASSRLS INHERIT {createdb}"
        row = self.connection.execute(
            text(
                "SELECT rolcanlogin, rolsuper, rolcreaterole, rolreplication, rolbypassrls,"
                " rolinherit, rolcreatedb FROM pg_roles WHERE rolname = :name"
            ),
            {"name": spec.name},
        ).one_or_none()
        if row is None:
            verifier = scram_verifier(self.connection, spec.name, spec.password)
            self._run(f"CREATE ROLE {role} {attributes} PASSWORD :verifier", verifier=verifier)
            result.changes.append("created")
            return
        wanted_replication = replication or (spec.replication and bool(row[3]))
        if tuple(row) != (True, False, False, wanted_replication, False, True, spec.createdb):
            self._run(f"ALTER ROLE {role} {attributes}")
            result.changes.append("attributes")
        stored = None
        if self.is_superuser:
            stored = self._scalar(
                "SELECT rolpassword FROM pg_authid WHERE rolname = :name", name=spec.name
            )
        else:
            log.warning("not a superuser: cannot read %s's verifier, setting it again", spec.name)
        if not scram_matches(stored, spec.password):
            verifier = scram_verifier(self.connection, spec.name, spec.password)
            self._run(f"ALTER ROLE {role} PASSWORD :verifier", verifier=verifier)
            result.changes.append("password")

    def _connect(self, spec: RoleSpec, result: RoleResult) -> None:
        if not self._scalar(
            "SELECT has_database_privilege(:name, current_database(), 'CONNECT')", name=spec.name
        ):
            self._run(
                f"GRANT CONNECT ON DATABASE {self.quote(self.database)} TO {self.quote(spec.name)}"
            )
            result.changes.append("connect")
        if not self._scalar(
            "SELECT has_schema_privilege(:name, :schema, 'USAGE')", name=spec.name, schema=SCHEMA
        ):
            self._run(f"GRANT USAGE ON SCHEMA {self.quote(SCHEMA)} TO {self.quote(spec.name)}")
            result.changes.append("schema usage")

    def _member(self, spec: RoleSpec, group: str, result: RoleResult) -> None:
        if not self._scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_auth_members m"
            " JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member"
            " WHERE g.rolname = :group AND r.rolname = :name)",
            group=group,
            name=spec.name,
        ):
            self._run(f"GRANT {self.quote(group)} TO {self.quote(spec.name)}")
            result.changes.append(group)

    def _relations(self, kinds: str, privileges: tuple[str, ...], role: str) -> list[str]:
        """Relations in the schema of the given ``relkind``s missing any of ``privileges``."""
        check = " AND ".join(
            f"has_{'sequence' if kinds == 'S' else 'table'}_privilege(:role, c.oid, '{p}')"
            for p in privileges
        )
        rows = self.connection.execute(
            text(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = :schema AND c.relkind = ANY(:kinds)"
                " AND c.relname <> ALL(:private)"
                f" AND NOT ({check}) ORDER BY c.relname"
            ),
            {"schema": SCHEMA, "kinds": list(kinds), "private": list(PRIVATE_TABLES), "role": role},
        )
        return [name for (name,) in rows]

    def _grant_on(
        self, spec: RoleSpec, kinds: str, privileges: tuple[str, ...], result: RoleResult
    ) -> None:
        missing = self._relations(kinds, privileges, spec.name)
        keyword = "SEQUENCE" if kinds == "S" else "TABLE"
        noun = {"S": "sequences", "vm": "views"}.get(kinds, "tables")
        for relation in missing:
            self._run(
                f"GRANT {', '.join(privileges)} ON {keyword} "
                f"{self.quote(SCHEMA)}.{self.quote(relation)} TO {self.quote(spec.name)}"
            )
        if missing:
            result.changes.append(f"{'/'.join(privileges).lower()} on {len(missing)} {noun}")

    def _defaults(
        self, spec: RoleSpec, objtype: str, privileges: tuple[str, ...], result: RoleResult
    ) -> None:
        """Privileges on what the current role creates later (the next migrations)."""
        granted = set(
            self.connection.execute(
                text(
                    "SELECT a.privilege_type FROM pg_default_acl d, aclexplode(d.defaclacl) a"
                    " WHERE d.defaclrole = (SELECT oid FROM pg_roles WHERE rolname = current_user)"
                    " AND d.defaclnamespace = CAST(:schema AS regnamespace)"
                    " AND d.defaclobjtype = :objtype"
                    " AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = :name)"
                ),
                {"schema": SCHEMA, "objtype": objtype, "name": spec.name},
            ).scalars()
        )
        if not set(privileges) <= granted:
            keyword = "SEQUENCES" if objtype == "S" else "TABLES"
            self._run(
                f"ALTER DEFAULT PRIVILEGES IN SCHEMA {self.quote(SCHEMA)} "
                f"GRANT {', '.join(privileges)} ON {keyword} TO {self.quote(spec.name)}"
            )
            result.changes.append(f"default privileges on {keyword.lower()}")

    def _app(self, spec: RoleSpec, result: RoleResult) -> None:
        self._grant_on(spec, "rp", APP_TABLE_PRIVILEGES, result)
        # read-only, so a service can tell whether the schema is at the revision it expects
        if self._scalar(
            "SELECT CASE WHEN to_regclass(:table) IS NULL THEN false"
            " ELSE NOT has_table_privilege(:name, :table, 'SELECT') END",
            table=f"{SCHEMA}.alembic_version",
            name=spec.name,
        ):
            self._run(
                f"GRANT SELECT ON TABLE {self.quote(SCHEMA)}.alembic_version"
                f" TO {self.quote(spec.name)}"
            )
            result.changes.append("select on alembic_version")
        self._grant_on(spec, "vm", READ_PRIVILEGES, result)
        self._grant_on(spec, "S", SEQUENCE_PRIVILEGES, result)
        self._defaults(spec, "r", APP_TABLE_PRIVILEGES, result)
        self._defaults(spec, "S", SEQUENCE_PRIVILEGES, result)

    def _backup(self, spec: RoleSpec, result: RoleResult) -> None:
        if self._scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pg_read_all_data')"
        ):
            self._member(spec, "pg_read_all_data", result)
        else:  # PostgreSQL 13: grant SELECT table by table, and on future tables
            self._grant_on(spec, "rpvm", READ_PRIVILEGES, result)
            self._grant_on(spec, "S", ("SELECT",), result)
            self._defaults(spec, "r", READ_PRIVILEGES, result)
        self._member(spec, "pg_monitor", result)
        self._pitr(spec, result)

    def _pitr(self, spec: RoleSpec, result: RoleResult) -> None:
        """What Barman needs beyond REPLICATION: checkpoints, backup and WAL control."""
        if not self.is_superuser:
            log.warning("not a superuser: cannot grant %s the backup functions", spec.name)
            return
        if self._scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pg_checkpoint')"):
            self._member(spec, "pg_checkpoint", result)
        major = 15 if self.server_version >= 150000 else 10
        granted = []
        for function in (*BACKUP_FUNCTIONS[major], *WAL_FUNCTIONS):
            if not self._scalar(
                "SELECT has_function_privilege(:name, :function, 'EXECUTE')",
                name=spec.name,
                function=function,
            ):
                self._run(f"GRANT EXECUTE ON FUNCTION {function} TO {self.quote(spec.name)}")
                granted.append(function.split("(")[0])
        if granted:
            result.changes.append(f"execute on {', '.join(granted)}")

    def lock_down_public_schema(self) -> list[str]:
        """Before PostgreSQL 15 every role may create objects in ``public``; take that away."""
        if self._scalar("SELECT has_schema_privilege('public', :schema, 'CREATE')", schema=SCHEMA):
            self._run(f"REVOKE CREATE ON SCHEMA {self.quote(SCHEMA)} FROM PUBLIC")
            return ["revoked CREATE on schema public from PUBLIC"]
        return []


def ensure_roles(connection: Connection, specs: list[RoleSpec]) -> list[RoleResult]:
    """Create or correct every role that has a password; run inside one transaction."""
    roles = _Roles(connection)
    results = [roles.ensure(spec) for spec in specs]
    if any(spec.password is not None for spec in specs):
        hardening = roles.lock_down_public_schema()
        if hardening:
            results.append(RoleResult("schema", SCHEMA, hardening))
    for item in results:
        if item.changes:
            log.info("role %s", item)
    return results
