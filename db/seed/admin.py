"""The first administrator and the one place its password may ever be written down.

With ``ADMIN_PASSWORD`` set, the stored argon2id hash is made to verify against it. Without it,
a password is generated only when the admin row is actually inserted, and written once to
``ADMIN_PASSWORD_OUTPUT`` with mode 0600, refusing to replace an existing file. The password
itself never reaches a log line, an exception message or the process arguments.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Table, literal_column, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Executable

from db.models import User
from db.seed.settings import SeedSettings

log = logging.getLogger(__name__)

USERS_TABLE: Table = User.__table__  # type: ignore[assignment]
GENERATED_PASSWORD_BYTES = 24
hasher = PasswordHasher()  # argon2id with the library's current recommended parameters


class AdminPasswordError(Exception):
    """The generated password cannot be written where it must go."""


@dataclass(frozen=True)
class AdminResult:
    action: str  # inserted | updated | unchanged
    password_file: Path | None = None

    @property
    def changed(self) -> int:
        return 0 if self.action == "unchanged" else 1


def hash_password(password: str) -> str:
    return hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def write_password_file(path: Path, password: str) -> None:
    """Create ``path`` readable by its owner only; never replace what is already there."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AdminPasswordError(
            f"ADMIN_PASSWORD_OUTPUT {path}: already exists and is never overwritten; "
            "set ADMIN_PASSWORD or move the file away"
        ) from None
    except OSError as exc:
        raise AdminPasswordError(
            f"ADMIN_PASSWORD_OUTPUT {path}: cannot create: {exc.strerror or exc}"
        ) from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask said
        os.write(fd, (password + "\n").encode())
    finally:
        os.close(fd)


def seed_admin(connection: Connection, settings: SeedSettings) -> AdminResult:
    """Create or update the administrator; the caller's transaction decides whether it sticks.

    When a password file was written and the transaction later rolls back, the caller must
    remove that file (see :func:`db.seed.run.seed`), or the next run would refuse to write one.
    """
    given = settings.admin_password
    password = given if given is not None else secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
    insert = pg_insert(USERS_TABLE).values(
        username=settings.admin_username,
        email=settings.admin_email,
        display_name="Administrator",
        role="admin",
        is_active=True,
        password_hash=hash_password(password),
    )
    keep = ("email", "role", "is_active")
    current = tuple(USERS_TABLE.c[name] for name in keep)
    proposed = tuple(insert.excluded[name] for name in keep)

    statement: Executable = insert.on_conflict_do_update(
        index_elements=["username"],
        set_={name: insert.excluded[name] for name in keep},
        where=tuple_(*current).is_distinct_from(tuple_(*proposed)),
    ).returning(literal_column("(xmax = 0)").label("inserted"))
    returned = connection.execute(statement).scalar_one_or_none()
    if returned is True:
        if given is not None:
            log.info(
                "admin user %r created with the password from ADMIN_PASSWORD",
                settings.admin_username,
            )
            return AdminResult("inserted")
        write_password_file(settings.admin_password_output, password)
        log.info(
            "admin user %r created; its generated password is in %s (mode 0600)",
            settings.admin_username,
            settings.admin_password_output,
        )
        return AdminResult("inserted", settings.admin_password_output)
    action = "updated" if returned is False else "unchanged"
    if given is not None:
        stored = connection.execute(
            select(User.password_hash)
            .where(User.username == settings.admin_username)
            .with_for_update()
        ).scalar_one()
        if not verify_password(stored, given) or hasher.check_needs_rehash(stored):
            connection.execute(
                update(User)
                .where(User.username == settings.admin_username)
                .values(password_hash=hash_password(given))
            )
            log.info(
                "admin user %r: password hash updated from ADMIN_PASSWORD", settings.admin_username
            )
            action = "updated"
    return AdminResult(action)
