"""Databases a restore creates, renames and keeps; it drops only the staging database it made.

A restore fills a staging database of its own and gives it the target's name only once
``pg_restore`` has succeeded: a failed or interrupted restore leaves the target as it was and no
new database behind. A target that is replaced is renamed to ``<name>_replaced_<time>`` and kept,
with its sessions ended and new ones refused only for the moment of the rename.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from db.errors import error_line
from ops.backup.pgtools import RESTORE_APPLICATION_NAME, backup_engine, quote_ident
from ops.backup.target import MAINTENANCE_DB
from ops.settings import Settings

log = logging.getLogger(__name__)

# Anything a user made: relations, schemas other than public, extensions other than plpgsql.
OBJECTS_SQL = text(
    r"""
    SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp\_%')
         + (SELECT count(*) FROM pg_namespace
            WHERE nspname NOT IN ('public', 'pg_catalog', 'information_schema')
              AND nspname NOT LIKE 'pg\_toast%' AND nspname NOT LIKE 'pg\_temp\_%')
         + (SELECT count(*) FROM pg_extension WHERE extname <> 'plpgsql')
    """
)
# Renaming a database takes its owner with CREATEDB, or a superuser.
TARGET_SQL = text(
    """
    SELECT pg_get_userbyid(d.datdba) AS owner, d.datallowconn AS allows_connections,
           d.datistemplate AS is_template,
           r.rolsuper OR (pg_has_role(d.datdba, 'USAGE') AND r.rolcreatedb) AS can_rename
    FROM pg_database d, pg_roles r
    WHERE d.datname = :name AND r.rolname = current_user
    """
)
EXISTS_SQL = text("SELECT 1 FROM pg_database WHERE datname = :name")


class ReplaceError(Exception):
    pass


@dataclass(frozen=True)
class TargetState:
    owner: str
    allows_connections: bool
    can_rename: bool
    objects: int
    is_template: bool = False


def admin_engine(settings: Settings, avoid: set[str]) -> Engine:
    """An engine on a database the restore does not rename: the configured one if it can,
    else ``postgres``, else ``template1`` (the configured one may be the target, or missing)."""
    first_error: OperationalError | None = None
    for database in (settings.db.database, MAINTENANCE_DB, "template1"):
        if not database or database in avoid:
            continue
        engine = backup_engine(settings.db, database, application_name=RESTORE_APPLICATION_NAME)
        try:
            engine.connect().close()
            return engine
        except OperationalError as error:
            engine.dispose()
            first_error = first_error or error
    assert first_error is not None
    raise first_error


def exists(connection: Connection, name: str) -> bool:
    return connection.execute(EXISTS_SQL, {"name": name}).first() is not None


def inspect_target(settings: Settings, connection: Connection, name: str) -> TargetState | None:
    """The target as it is now, or ``None`` when there is no such database."""
    row = connection.execute(TARGET_SQL, {"name": name}).first()
    if row is None:
        return None
    objects = 0
    if row.allows_connections and not row.is_template:
        engine = backup_engine(settings.db, name, application_name=RESTORE_APPLICATION_NAME)
        try:
            with engine.connect() as target:
                objects = int(target.execute(OBJECTS_SQL).scalar_one())
        finally:
            engine.dispose()
    return TargetState(
        str(row.owner),
        bool(row.allows_connections),
        bool(row.can_rename),
        objects,
        bool(row.is_template),
    )


def create(connection: Connection, name: str) -> None:
    connection.execute(text(f"CREATE DATABASE {quote_ident(name)} TEMPLATE template0"))


def drop_staging(connection: Connection, name: str) -> None:
    """Drop a staging database this restore created; a failure is logged, not raised over the
    error that brought us here."""
    try:
        connection.execute(text(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)"))
    except Exception as error:  # the original failure matters more than this one
        log.warning("could not drop staging database %s: %s", name, error)


def rename(connection: Connection, old: str, new: str) -> None:
    connection.execute(text(f"ALTER DATABASE {quote_ident(old)} RENAME TO {quote_ident(new)}"))


def _allow_connections(connection: Connection, name: str, allow: bool) -> None:
    value = "true" if allow else "false"
    connection.execute(text(f"ALTER DATABASE {quote_ident(name)} WITH ALLOW_CONNECTIONS {value}"))


def swap_in(
    connection: Connection, staging: str, target: str, kept: str, state: TargetState
) -> None:
    """Rename ``target`` to ``kept`` and ``staging`` to ``target``.

    New sessions are refused and the target's sessions ended just before the rename (the
    services reconnect to the restored database); if the rename fails, the target is left as it
    was, accepting connections again.
    """
    if exists(connection, kept):
        raise ReplaceError(f"cannot keep {target} as {kept}: a database of that name exists")
    if state.allows_connections:
        _allow_connections(connection, target, False)
    try:
        connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": target},
        )
        rename(connection, target, kept)
    except BaseException:
        if state.allows_connections:
            _allow_connections(connection, target, True)
        raise
    if state.allows_connections:
        _allow_connections(connection, kept, True)
    try:
        rename(connection, staging, target)
    except SQLAlchemyError as error:
        try:
            rename(connection, kept, target)  # put it back; the caller drops the staging copy
        except SQLAlchemyError:
            raise ReplaceError(
                f"could not name the restored database {target} ({error_line(error)}) nor "
                f"rename {kept} back: the old database is kept as {kept}"
            ) from error
        raise
    _carry_owner_and_grants(connection, kept, target, state.owner)


def _carry_owner_and_grants(connection: Connection, kept: str, target: str, owner: str) -> None:
    """The restored database gets the replaced one's owner and database privileges (CONNECT,
    CREATE, TEMP), which a dump without ``--create`` does not carry."""
    try:
        connection.execute(
            text(f"ALTER DATABASE {quote_ident(target)} OWNER TO {quote_ident(owner)}")
        )
        grants = connection.execute(
            text(
                "SELECT a.grantee = 0 AS public, pg_get_userbyid(a.grantee) AS grantee,"
                " a.privilege_type, a.is_grantable"
                " FROM pg_database d, aclexplode(d.datacl) a"
                " WHERE d.datname = :name AND a.grantee <> d.datdba"
            ),
            {"name": kept},
        ).all()
        has_acl = connection.execute(
            text("SELECT datacl IS NOT NULL FROM pg_database WHERE datname = :name"),
            {"name": kept},
        ).scalar_one()
        if not has_acl:
            return  # the defaults, as the new database has
        database = quote_ident(target)
        connection.execute(text(f"REVOKE ALL ON DATABASE {database} FROM PUBLIC"))
        for grant in grants:
            grantee = "PUBLIC" if grant.public else quote_ident(grant.grantee)
            option = " WITH GRANT OPTION" if grant.is_grantable else ""
            connection.execute(
                text(f"GRANT {grant.privilege_type} ON DATABASE {database} TO {grantee}{option}")
            )
    except Exception as error:  # the data is in place; say what to redo by hand
        log.warning(
            "restored %s but could not give it %s's owner and privileges: %s", target, kept, error
        )
