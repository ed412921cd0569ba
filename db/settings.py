"""Typed settings read once from the environment.

Every problem in the environment is collected before anything connects, so an operator fixes
them in one round instead of one restart per typo. Problems read ``VARIABLE value: reason``;
secret values are never echoed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
REDACTED = "***"


class ConfigError(Exception):
    """Raised with every configuration problem found, not just the first."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``500ms``, ``15m``, ``26h``, ``7d`` or ``2w``."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError("not a duration (examples: 30s, 15m, 26h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _shown(value: str) -> str:
    return value if value and not any(c.isspace() for c in value) else repr(value)


class EnvReader:
    """Reads typed values from an environment mapping and collects the problems it meets."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.problems: list[str] = []

    def problem(self, name: str, value: str | None, reason: str, *, secret: bool = False) -> None:
        shown = REDACTED if secret else _shown(value or "")
        self.problems.append(f"{name} {shown}: {reason}")

    def raw(self, name: str) -> str | None:
        value = self.environ.get(name)
        return value if value not in (None, "") else None

    def secret(self, name: str) -> str | None:
        """``NAME`` or the content of the file named by ``NAME_FILE`` (Docker secrets)."""
        direct, path = self.raw(name), self.raw(f"{name}_FILE")
        if direct is not None and path is not None:
            self.problem(f"{name}_FILE", path, f"set together with {name}; set only one")
            return None
        if path is None:
            return direct
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            self.problem(f"{name}_FILE", path, f"cannot read: {exc.strerror or exc}")
            return None

    def _typed(self, name: str, default: T, convert: Callable[[str], T], reason: str) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return convert(value.strip())
        except ValueError as exc:
            self.problem(name, value, str(exc) or reason)
            return default

    def string(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        def convert(text: str) -> int:
            try:
                number = int(text)
            except ValueError:
                raise ValueError("must be a whole number") from None
            _check_range(number, minimum, maximum)
            return number

        return self._typed(name, default, convert, "must be a whole number")

    def number(self, name: str, default: float, *, minimum: float | None = None) -> float:
        def convert(text: str) -> float:
            try:
                number = float(text)
            except ValueError:
                raise ValueError("must be a number") from None
            _check_range(number, minimum, None)
            return number

        return self._typed(name, default, convert, "must be a number")

    def duration(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        def convert(text: str) -> float:
            seconds = parse_duration(text)
            if seconds < minimum:
                raise ValueError(f"must be at least {minimum:g}s")
            return seconds

        return self._typed(name, default, convert, "not a duration")

    def boolean(self, name: str, default: bool) -> bool:
        def convert(text: str) -> bool:
            lowered = text.lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError("must be true or false")

        return self._typed(name, default, convert, "must be true or false")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def convert(text: str) -> str:
            if text.lower() not in choices:
                raise ValueError(f"must be one of {', '.join(choices)}")
            return text.lower()

        return self._typed(name, default, convert, "invalid choice")

    def finish(self) -> None:
        if self.problems:
            raise ConfigError(list(self.problems))


def _check_range(number: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and number < minimum:
        raise ValueError(f"must be >= {minimum:g}")
    if maximum is not None and number > maximum:
        raise ValueError(f"must be <= {maximum:g}")


@dataclass(frozen=True)
class DbSettings:
    """How to reach PostgreSQL and how to pool connections to it."""

    url: URL
    pool_size: int = 20
    max_overflow: int = 40
    pool_timeout: float = 30.0
    pool_recycle: int = 3600
    pool_pre_ping: bool = True
    application_name: str = "dbops"
    connect_timeout: int = 10
    statement_timeout: float = 0.0

    @property
    def redacted_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    @property
    def database(self) -> str:
        return self.url.database or ""


def read_postgres_url(reader: EnvReader, name: str) -> tuple[bool, URL | None]:
    """A ``postgresql://`` URL from ``name`` (or ``name_FILE``): whether it was set, and the
    URL, or ``None`` with the problem recorded. Problems never show the password."""
    text = reader.secret(name)
    if text is None:
        return False, None
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        # The text may hold a password; show only what cannot be one.
        reader.problem(name, redact_url_text(text), "not a database URL")
        return True, None
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() not in ("postgresql", "postgres"):
        reader.problem(name, shown, "must be a postgresql:// URL")
        return True, None
    if not url.database:
        reader.problem(name, shown, "names no database")
        return True, None
    return True, url.set(drivername="postgresql+psycopg2")


def _database_url(reader: EnvReader) -> URL | None:
    given, url = read_postgres_url(reader, "DATABASE_URL")
    if given:
        return url
    host = reader.string("POSTGRES_HOST", "localhost")
    port = reader.integer("POSTGRES_PORT", 5432, minimum=1, maximum=65535)
    return URL.create(
        "postgresql+psycopg2",
        username=reader.string("POSTGRES_USER", "dbops"),
        password=reader.secret("POSTGRES_PASSWORD"),
        host=host,
        port=port,
        database=reader.string("POSTGRES_DB", "dbops"),
    )


def redact_url_text(text: str) -> str:
    """Hide anything between ``://user:`` and ``@`` in text that may not parse as a URL."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", rf"\1{REDACTED}@", text)


def read_db_settings(reader: EnvReader) -> DbSettings:
    url = _database_url(reader)
    application_name = reader.string("DB_APPLICATION_NAME", "dbops")
    if len(application_name) > 63 or not application_name.isprintable():
        reader.problem("DB_APPLICATION_NAME", application_name, "must be printable, <= 63 chars")
    return DbSettings(
        url=url if url is not None else make_url("postgresql+psycopg2:///invalid"),
        pool_size=reader.integer("DB_POOL_SIZE", 20, minimum=1),
        max_overflow=reader.integer("DB_MAX_OVERFLOW", 40, minimum=0),
        pool_timeout=reader.number("DB_POOL_TIMEOUT", 30.0, minimum=0.001),
        pool_recycle=reader.integer("DB_POOL_RECYCLE", 3600, minimum=0),
        pool_pre_ping=reader.boolean("DB_POOL_PRE_PING", True),
        application_name=application_name,
        connect_timeout=reader.integer("DB_CONNECT_TIMEOUT", 10, minimum=1),
        statement_timeout=reader.duration("DB_STATEMENT_TIMEOUT", 0.0),
    )


def database_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """``DB_ENABLED`` (default true), read on its own: a service with the database switched off
    need not have the rest of the connection settings."""
    reader = EnvReader(environ)
    enabled = reader.boolean("DB_ENABLED", True)
    reader.finish()
    return enabled


def load_db_settings(environ: Mapping[str, str] | None = None) -> DbSettings:
    """The database settings alone, for services that import ``db``."""
    reader = EnvReader(environ)
    settings = read_db_settings(reader)
    reader.finish()
    return settings
