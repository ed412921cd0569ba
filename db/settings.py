"""Typed settings read once from the environment.

Every problem in the environment is collected before anything connects, so an operator fixes
them in one round instead of one restart per typo. Problems read ``VARIABLE value: reason``;
secret values are never echoed.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from db.pgurl import PgUrl, parse_url
from db.redact import REDACTED, redact, redact_unparsed_url, redact_url
from db.urls import INT_MAX, name_problem, url_problem, url_text_problem

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# Python's timers (threading, APScheduler's datetimes) take far less than any float: a century
# is past every sensible interval and well inside threading.TIMEOUT_MAX (292 years).
MAX_TIMER_SECONDS = 100 * 365 * 86400.0
# PostgreSQL's timeouts are int milliseconds; a nonzero value under 1 ms would become 0 = off.
MAX_POSTGRES_MS = INT_MAX
MAX_CONNECTIONS = 262143  # PostgreSQL's own limit on max_connections
MAX_SECRET_FILE_BYTES = 64 * 1024

__all__ = ["REDACTED", "ConfigError", "DbSettings", "EnvReader", "load_db_settings"]


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


def _seconds_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _shown(value: str) -> str:
    return value if value and not any(c.isspace() for c in value) else repr(value)


class EnvReader:
    """Reads typed values from an environment mapping and collects the problems it meets."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.problems: list[str] = []

    def problem(self, name: str, value: str | None, reason: str, *, secret: bool = False) -> None:
        shown = REDACTED if secret else redact(_shown(value or ""))
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
            return read_secret_file(path)
        except ValueError as exc:
            self.problem(f"{name}_FILE", path, str(exc))
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
        self, name: str, default: int, *, minimum: int | None = None, maximum: int = INT_MAX
    ) -> int:
        def convert(text: str) -> int:
            try:
                number = int(text)
            except ValueError:
                raise ValueError("must be a whole number") from None
            _check_range(number, minimum, maximum)
            return number

        return self._typed(name, default, convert, "must be a whole number")

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float = MAX_TIMER_SECONDS,
    ) -> float:
        def convert(text: str) -> float:
            try:
                number = float(text)
            except ValueError:
                raise ValueError("must be a number") from None
            if not math.isfinite(number):
                raise ValueError("must be a finite number")
            _check_range(number, minimum, maximum)
            return number

        return self._typed(name, default, convert, "must be a number")

    def duration(
        self,
        name: str,
        default: float,
        *,
        minimum: float = 0.0,
        maximum: float = MAX_TIMER_SECONDS,
        postgres: bool = False,
    ) -> float:
        """Seconds; ``postgres`` for a value the server takes as int milliseconds."""
        if postgres:
            maximum = min(maximum, MAX_POSTGRES_MS / 1000)

        def convert(text: str) -> float:
            seconds = parse_duration(text)
            if seconds < minimum:
                raise ValueError(f"must be at least {minimum:g}s")
            if seconds > maximum:
                if postgres:
                    raise ValueError(
                        f"must be at most {round(maximum * 1000)}ms "
                        f"({maximum / 86400:.1f}d, PostgreSQL's limit)"
                    )
                raise ValueError(
                    f"must be at most {_seconds_text(maximum)} (the longest timer supported)"
                )
            if postgres and 0 < seconds < 0.001:
                raise ValueError(
                    "under 1ms, which PostgreSQL rounds to 0 (no timeout): use at least 1ms, "
                    "or 0 for none"
                )
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
        if self.problems:  # a variable read by two sections is reported once
            raise ConfigError(list(dict.fromkeys(self.problems)))


def read_secret_file(path: str) -> str:
    """A secret file's text, or ``ValueError`` saying why it cannot be one.

    Only a regular file of at most 64 KiB of UTF-8 is read: opening a FIFO would block until a
    writer comes, and ``/dev/zero`` would be read until memory ran out. ``O_NONBLOCK`` keeps the
    open itself from waiting; the type is checked on the open descriptor, not on the name.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise ValueError(f"cannot read: {kind}")
        if info.st_size > MAX_SECRET_FILE_BYTES:
            raise ValueError(f"larger than {MAX_SECRET_FILE_BYTES // 1024} KiB")
        data = b""
        while len(data) <= MAX_SECRET_FILE_BYTES:
            chunk = os.read(fd, MAX_SECRET_FILE_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
        if len(data) > MAX_SECRET_FILE_BYTES:
            raise ValueError(f"larger than {MAX_SECRET_FILE_BYTES // 1024} KiB")
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    if "\x00" in text:  # libpq and the C strings behind it would cut the value there
        raise ValueError("holds a NUL character")
    return text


def _check_range(number: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and number < minimum:
        raise ValueError(f"must be >= {_number_text(minimum)}")
    if maximum is not None and number > maximum:
        raise ValueError(f"must be <= {_number_text(maximum)}")


def _number_text(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


@dataclass(frozen=True)
class DbSettings:
    """How to reach PostgreSQL and how to pool connections to it."""

    # a SQLAlchemy URL given here becomes a PgUrl of the same parts; the repr of either hides
    # a userinfo password, not a ?password=
    url: PgUrl = field(repr=False)
    pool_size: int = 20
    max_overflow: int = 40
    pool_timeout: float = 30.0
    pool_recycle: int = 3600
    pool_pre_ping: bool = True
    application_name: str = "dbops"
    connect_timeout: int = 10
    statement_timeout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", PgUrl.of(self.url))

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)

    @property
    def database(self) -> str:
        return self.url.database or ""


def read_postgres_url(
    reader: EnvReader, name: str, password_variable: str
) -> tuple[bool, PgUrl | None]:
    """A ``postgresql://`` URL from ``name`` (or ``name_FILE``): whether it was set, and the
    URL, or ``None`` with the problem recorded. Problems never show any part of the password.

    A URL without a password takes the one in ``password_variable`` (or its ``_FILE``), so a
    password that would need percent-encoding can stay out of the URL altogether.
    """
    text = reader.secret(name)
    if text is None:
        return False, None
    text = text.strip()  # a stray space or newline around the URL is no part of it
    password = reader.secret(password_variable)  # read (and checked) whatever the URL says
    if (reason := url_text_problem(text, password_variable)) is not None:
        reader.problem(name, redact_unparsed_url(text), reason)
        return True, None
    try:
        url = parse_url(text)
    except ValueError:
        reader.problem(
            name,
            redact_unparsed_url(text),
            "not a database URL (postgresql://USER:PASSWORD@HOST:PORT/DATABASE)",
        )
        return True, None
    shown = redact_url(url)
    if url.get_backend_name() not in ("postgresql", "postgres"):
        reader.problem(name, shown, "must be a postgresql:// URL")
        return True, None
    if not url.database:
        reader.problem(name, shown, "names no database")
        return True, None
    if (reason := url_problem(url)) is not None:
        reader.problem(name, redact_url(url.set(query={})), reason)
        return True, None
    if url.password is None and "password" not in url.query and password is not None:
        url = url.set(password=password)
    return True, url.set(drivername="postgresql+psycopg2")


def _database_url(reader: EnvReader) -> PgUrl | None:
    given, url = read_postgres_url(reader, "DATABASE_URL", "POSTGRES_PASSWORD")
    if given:
        return url
    host = reader.string("POSTGRES_HOST", "localhost")
    port = reader.integer("POSTGRES_PORT", 5432, minimum=1, maximum=65535)
    names = {name: reader.string(name, "dbops") for name in ("POSTGRES_USER", "POSTGRES_DB")}
    for name, value in names.items():
        if (reason := name_problem(value)) is not None:
            reader.problem(name, value, reason)
    return PgUrl.create(
        "postgresql+psycopg2",
        username=names["POSTGRES_USER"],
        password=reader.secret("POSTGRES_PASSWORD"),
        host=host,
        port=port,
        database=names["POSTGRES_DB"],
    )


def is_application_name(name: str, limit: int) -> bool:
    """PostgreSQL turns non-ASCII characters of application_name into '?' and cuts it at 63
    bytes: a name it would change would no longer match the metrics and logs that carry it."""
    return name.isascii() and name.isprintable() and len(name) <= limit


def read_db_settings(reader: EnvReader) -> DbSettings:
    url = _database_url(reader)
    application_name = reader.string("DB_APPLICATION_NAME", "dbops")
    if not is_application_name(application_name, 63):
        reader.problem(
            "DB_APPLICATION_NAME", application_name, "must be printable ASCII, <= 63 chars"
        )
    return DbSettings(
        url=url if url is not None else parse_url("postgresql+psycopg2:///invalid"),
        pool_size=reader.integer("DB_POOL_SIZE", 20, minimum=1, maximum=MAX_CONNECTIONS),
        max_overflow=reader.integer("DB_MAX_OVERFLOW", 40, minimum=0, maximum=MAX_CONNECTIONS),
        pool_timeout=reader.number("DB_POOL_TIMEOUT", 30.0, minimum=0.001),
        pool_recycle=reader.integer("DB_POOL_RECYCLE", 3600, minimum=0),
        pool_pre_ping=reader.boolean("DB_POOL_PRE_PING", True),
        application_name=application_name,
        connect_timeout=reader.integer("DB_CONNECT_TIMEOUT", 10, minimum=1),
        statement_timeout=reader.duration("DB_STATEMENT_TIMEOUT", 0.0, postgres=True),
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
