"""Errors turned into what an operator reads: one line, never a traceback."""

from __future__ import annotations

from db.redact import redact


class DatabaseDisabled(RuntimeError):
    """``DB_ENABLED=false``: the service runs without its database. Catch this to fall back
    (serve from a cache, answer 503, queue the work) instead of failing on a connection."""


def error_line(error: BaseException) -> str:
    """The first line of what the driver said (``orig`` of a SQLAlchemy error), else the error's.

    libpq messages continue with ``DETAIL``/``HINT`` lines and SQLAlchemy appends the statement
    and a link; a log line or an exit message wants only the first line. Any password in it (a
    conninfo echoed by an error, a URL) is redacted.
    """
    original = getattr(error, "orig", None) or error
    lines = str(original).strip().splitlines()
    return redact(lines[0]) if lines else type(original).__name__
