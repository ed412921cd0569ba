"""What the seed needs from the environment: who the first administrator is."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from db.settings import EnvReader


def _default_password_output() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "dbops" / "admin-password"


@dataclass(frozen=True)
class SeedSettings:
    admin_username: str = "admin"
    admin_email: str = "admin@localhost"
    admin_password: str | None = field(default=None, repr=False, metadata={"secret": True})
    admin_password_output: Path = field(default_factory=_default_password_output)


def read_seed_settings(reader: EnvReader) -> SeedSettings:
    username = reader.string("ADMIN_USERNAME", "admin")
    if username != username.lower() or not username.strip() or len(username) > 64:
        reader.problem("ADMIN_USERNAME", username, "must be lowercase, 1-64 characters")
    password = reader.secret("ADMIN_PASSWORD")
    if password is not None and len(password) < 12:
        reader.problem("ADMIN_PASSWORD", password, "must be at least 12 characters", secret=True)
    output = reader.raw("ADMIN_PASSWORD_OUTPUT")
    return SeedSettings(
        admin_username=username,
        admin_email=reader.string("ADMIN_EMAIL", "admin@localhost"),
        admin_password=password,
        admin_password_output=Path(output) if output else _default_password_output(),
    )
