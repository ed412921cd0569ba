"""What ``ops db init`` needs from the environment beyond the connection.

The first administrator, the database roles the other services log in as, and how long to wait
for the server. Every value is validated up front with the rest of the configuration.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from db.settings import EnvReader

# Unquoted PostgreSQL identifiers only: role names end up in GRANT statements and in URLs.
_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
MIN_ADMIN_PASSWORD = 12
MIN_ROLE_PASSWORD = 12


def _default_password_output() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "dbops" / "admin-password"


@dataclass(frozen=True)
class SeedSettings:
    admin_username: str = "admin"
    admin_email: str = "admin@localhost"
    admin_password: str | None = field(default=None, repr=False, metadata={"secret": True})
    admin_password_output: Path = field(default_factory=_default_password_output)
    wait_timeout: float = 60.0
    app_db_user: str = "dbops_app"
    app_db_password: str | None = field(default=None, repr=False, metadata={"secret": True})
    monitor_db_user: str = "dbops_monitor"
    monitor_db_password: str | None = field(default=None, repr=False, metadata={"secret": True})
    backup_db_user: str = "dbops_backup"
    backup_db_password: str | None = field(default=None, repr=False, metadata={"secret": True})


def _role(reader: EnvReader, prefix: str, default: str) -> tuple[str, str | None]:
    name = reader.string(f"{prefix}_DB_USER", default)
    if not _ROLE_NAME.match(name) or name.startswith("pg_"):
        reader.problem(
            f"{prefix}_DB_USER", name, "must be a lowercase identifier ([a-z_][a-z0-9_]*), not pg_*"
        )
    password = reader.secret(f"{prefix}_DB_PASSWORD")
    if password is not None and len(password) < MIN_ROLE_PASSWORD:
        reader.problem(
            f"{prefix}_DB_PASSWORD",
            password,
            f"must be at least {MIN_ROLE_PASSWORD} characters",
            secret=True,
        )
    return name, password


def read_seed_settings(reader: EnvReader) -> SeedSettings:
    username = reader.string("ADMIN_USERNAME", "admin")
    if username != username.lower() or not username.strip() or len(username) > 64:
        reader.problem("ADMIN_USERNAME", username, "must be lowercase, 1-64 characters")
    password = reader.secret("ADMIN_PASSWORD")
    if password is not None and len(password) < MIN_ADMIN_PASSWORD:
        reader.problem(
            "ADMIN_PASSWORD",
            password,
            f"must be at least {MIN_ADMIN_PASSWORD} characters",
            secret=True,
        )
    output = reader.raw("ADMIN_PASSWORD_OUTPUT")
    app_user, app_password = _role(reader, "APP", SeedSettings.app_db_user)
    monitor_user, monitor_password = _role(reader, "MONITOR", SeedSettings.monitor_db_user)
    backup_user, backup_password = _role(reader, "BACKUP", SeedSettings.backup_db_user)
    names = [app_user, monitor_user, backup_user]
    if len(set(names)) != len(names):
        reader.problem(
            "APP_DB_USER",
            app_user,
            "APP_, MONITOR_ and BACKUP_DB_USER must be three different roles",
        )
    return SeedSettings(
        admin_username=username,
        admin_email=reader.string("ADMIN_EMAIL", "admin@localhost"),
        admin_password=password,
        admin_password_output=Path(output) if output else _default_password_output(),
        wait_timeout=reader.duration("DB_WAIT_TIMEOUT", SeedSettings.wait_timeout, minimum=0),
        app_db_user=app_user,
        app_db_password=app_password,
        monitor_db_user=monitor_user,
        monitor_db_password=monitor_password,
        backup_db_user=backup_user,
        backup_db_password=backup_password,
    )
