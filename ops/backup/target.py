"""What a restore may write into, decided before anything connects.

``--target-db`` is a database *name*. libpq would read a ``dbname`` that looks like a connection
string (``dbname=victim``, ``host=elsewhere``, ``postgresql://…``) as one, which let a target slip
past the emptiness check into another database, or send the restore and its password to another
host. So a name that libpq could read as a connection string is refused here, and every name
reaches libpq quoted as a single ``dbname`` value (:func:`conninfo`) and SQL as an identifier.

The template databases are never a target: whatever a restore puts into ``template1`` is copied
into every database created afterwards. ``postgres`` is where tools connect by default and needs
an explicit option. The live database (the one the stack runs on, or the one the backup was taken
of) needs ``--force --replace-live``, and is renamed and kept rather than dropped.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime

from ops.hints import spell

MAX_NAME_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL silently truncates longer identifiers
TEMPLATES = ("template0", "template1")
MAINTENANCE_DB = "postgres"
# Scratch databases that a drill drops unasked (dbops_verify_<id>), and a restore's own staging.
SCRATCH_PREFIX = "dbops_verify_"
STAGING_PREFIX = "dbops_restoring_"
RESERVED_PREFIXES = (SCRATCH_PREFIX, STAGING_PREFIX)
KEPT_INFIX = "_replaced_"
_URI_PREFIXES = ("postgresql://", "postgres://")
_SHOWN_CHARS = 60


class TargetError(ValueError):
    """A target the command line must not ask for; the message is one line, exit code 2."""


def _escaped(ch: str) -> str:
    if unicodedata.category(ch) in ("Cc", "Cs"):  # control, or an undecodable byte from argv
        return ch.encode("unicode_escape").decode("ascii")
    return ch


def shown(name: str) -> str:
    """``name`` quoted for one log or error line: control characters escaped, length capped."""
    escaped = "".join(_escaped(ch) for ch in name[: _SHOWN_CHARS + 1])
    if len(name) > _SHOWN_CHARS:
        escaped = escaped[:_SHOWN_CHARS] + f"… ({len(name)} characters)"
    return f"'{escaped}'"


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a database name dbops creates, or ``None`` if it can."""
    if not name:
        return "a database name cannot be empty"
    if "\x00" in name:
        return "a database name cannot contain NUL"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "a database name must be valid UTF-8"
    for ch in name:
        if unicodedata.category(ch) == "Cc":
            return f"a database name cannot contain control characters ({_escaped(ch)})"
    if size > MAX_NAME_BYTES:
        return (
            f"a database name is at most {MAX_NAME_BYTES} bytes in UTF-8; this one is {size} "
            "(PostgreSQL would truncate it to another name)"
        )
    if "=" in name or name.lower().startswith(_URI_PREFIXES):
        return (
            "this is a database name, not a connection string; the server and credentials "
            "come from DATABASE_URL / POSTGRES_*"
        )
    return None


def check_target(
    name: str,
    *,
    live: dict[str, str],
    force: bool = False,
    replace_live: bool = False,
    allow_postgres: bool = False,
) -> None:
    """Refuse a target the command line must not ask for; ``live`` maps names to why they are."""
    problem = name_problem(name)
    if problem is None and name in TEMPLATES:
        problem = "a template database is never a restore target (what it holds is copied "
        problem += "into every database created afterwards)"
    reserved = [prefix for prefix in RESERVED_PREFIXES if name.startswith(prefix)]
    if problem is None and reserved:
        problem = f"names starting with {reserved[0]} are dbops' own scratch databases, "
        problem += "dropped without asking"
    if problem is None and name == MAINTENANCE_DB and not allow_postgres:
        problem = "the maintenance database tools connect to by default; "
        problem += f"add {spell('--allow-postgres-db')} to restore into it"
    if problem is None and name in live and not (force and replace_live):
        problem = f"this is {live[name]}: replacing it needs {spell('--force')} "
        problem += f"{spell('--replace-live')} "
        problem += "(the current database is renamed and kept, not dropped)"
    if problem is None and replace_live and name not in live:
        names = ", ".join(sorted(live)) or "none"
        problem = f"{spell('--replace-live')} is only for the live database ({names}); "
        problem += "this is not it"
    if problem is not None:
        raise TargetError(f"{spell('--target-db')} {shown(name)}: {problem}")


def conninfo(name: str) -> str:
    """``name`` as a libpq connection string that sets ``dbname`` to exactly ``name``.

    pg_restore reads ``--dbname`` as a connection string whenever it contains ``=``; written as a
    quoted value, the name is taken literally and the other parameters still come from the
    environment (``PGHOST``, ``PGUSER``, …), for the main session and every ``--jobs`` worker.
    """
    return "dbname='" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fit(prefix: str, suffix: str) -> str:
    """``prefix + suffix``, the prefix cut on a character boundary to fit in 63 bytes."""
    room = MAX_NAME_BYTES - len(suffix.encode("utf-8"))
    cut = prefix.encode("utf-8")[:room].decode("utf-8", "ignore")
    return cut + suffix


def kept_name(name: str, when: datetime) -> str:
    """Where a replaced database is kept: ``<name>_replaced_<UTC time>``, at most 63 bytes."""
    return _fit(name, f"{KEPT_INFIX}{when:%Y%m%dT%H%M%SZ}")


def staging_name(when: datetime, token: str) -> str:
    """The database a restore fills before it takes the target's name."""
    return _fit(STAGING_PREFIX, f"{when:%Y%m%dT%H%M%SZ}_{token}")
