"""Checks of a ``postgresql://`` URL that must pass before anything connects with it.

SQLAlchemy reads ``user:p@ss@host`` as the password ``p`` and the host ``ss@host``: the tail of
the password was then logged as a host name and even sent to a DNS lookup. RFC 3986 readers
(libpq, urllib, other drivers) cut the userinfo at a ``/``, ``?`` or ``#`` that SQLAlchemy keeps.
A URL that two readers can understand differently is refused, with the way out in the message.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from db.pgurl import PgUrl

INT_MAX = 2**31 - 1  # libpq parses integer parameters into a C int
NAME_BYTES = 63  # PostgreSQL cuts longer database and role names: one would log in elsewhere
# Query parameters libpq reads as integers, and the ranges it (or the server) accepts.
_INTEGER_PARAMETERS = {
    "connect_timeout": (0, INT_MAX),
    "keepalives": (0, 1),
    "keepalives_idle": (0, INT_MAX),
    "keepalives_interval": (0, INT_MAX),
    "keepalives_count": (0, INT_MAX),
    "tcp_user_timeout": (0, INT_MAX),
}
# What SQLAlchemy takes as ``username[:password]@`` at the start of the authority.
_SQLALCHEMY_USERINFO = re.compile(r"^(?P<username>[^:/]*)(?::(?P<password>[^@]*))?@")


def ambiguous_userinfo_hint(password_variable: str) -> str:
    return (
        "the user name or password holds an unencoded '@', ':', '/', '#' or '?' (or a space), "
        "so the URL reads two ways: percent-encode it (@ %40, : %3A, / %2F, # %23, ? %3F, "
        f"space %20), or leave the password out of the URL and set {password_variable} "
        f"or {password_variable}_FILE"
    )


def url_text_problem(text: str, password_variable: str) -> str | None:
    """Why URL text is ambiguous, or ``None``; read before the URL is parsed."""
    _, sep, rest = text.partition("://")
    if not sep:
        return None  # not a URL at all: the parser says so
    end = len(rest)
    for delimiter in "/?#":
        found = rest.find(delimiter)
        if found != -1:
            end = min(end, found)
    authority = rest[:end]
    rfc_userinfo = authority.rpartition("@")[0] if "@" in authority else None
    match = _SQLALCHEMY_USERINFO.match(rest)
    sqlalchemy_userinfo = rest[: match.end() - 1] if match else None
    if rfc_userinfo != sqlalchemy_userinfo:
        return ambiguous_userinfo_hint(password_variable)
    if rfc_userinfo is not None and (
        "@" in rfc_userinfo
        or rfc_userinfo.count(":") > 1
        or any(c.isspace() or not c.isprintable() for c in rfc_userinfo)
    ):
        return ambiguous_userinfo_hint(password_variable)
    if "#" in rest:
        return "holds an unencoded '#', where RFC 3986 readers cut a URL: percent-encode it (%23)"
    path, _, query = rest[end:].partition("?")
    if any(item and "=" not in item for item in query.split("&")):
        # SQLAlchemy drops such an item: the tail of a password cut by an unencoded '&'.
        return "a query item has no '=' (an unencoded '&' in a value?): percent-encode it (%26)"
    if "@" in path:  # user:pa/ss@host: the '@' lands after the host, the '/' ends it
        return ambiguous_userinfo_hint(password_variable)
    return None


def url_problem(url: PgUrl) -> str | None:
    """Why a parsed URL would fail at connection time, or ``None``."""
    if url.port is not None and not 0 < url.port < 65536:
        return "port must be 1-65535"
    for part, name in (("database", url.database), ("user", url.username)):
        if (reason := name_problem(name or "")) is not None:
            return f"{part} name {reason}"
    if "dbname" in url.query:
        # It would win over the path, and over every database the jobs pick (restore targets,
        # verification scratch databases), sending their work to the wrong one.
        return "query parameter dbname is not allowed: name the database in the URL's path"
    if "service" in url.query:
        # pg_dump and pg_restore get their target in PGDATABASE, and libpq lets a service
        # file's settings win over environment variables.
        return "query parameter service is not allowed: spell the connection out in the URL"
    for key, value in url.query.items():
        values = [value] if isinstance(value, str) else list(value)
        for item in values:
            if key == "port":
                for port in item.split(","):
                    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
                        return "query parameter port must be 1-65535 (a list for several hosts)"
            elif key in _INTEGER_PARAMETERS:
                low, high = _INTEGER_PARAMETERS[key]
                if not (item.isascii() and item.isdigit() and low <= int(item) <= high):
                    return f"query parameter {key} must be a whole number {low}-{high}"
    return _unknown_parameter(url)


def name_problem(name: str) -> str | None:
    """Why PostgreSQL would not take ``name`` as it is for a database or role, or ``None``."""
    if len(name.encode("utf-8", "surrogatepass")) > NAME_BYTES:
        return f"is longer than {NAME_BYTES} bytes, where PostgreSQL would cut it"
    if any(not c.isprintable() for c in name):
        return "holds a control character"
    return None


def _unknown_parameter(url: PgUrl) -> str | None:
    """A query key the installed libpq does not know fails every connection: say so now."""
    if not url.query:  # the usual URL: no need to load libpq's bindings to check nothing
        return None
    from psycopg2 import ProgrammingError
    from psycopg2.extensions import parse_dsn

    for key in url.query:
        if not re.fullmatch(r"[a-z_]{1,40}", key):
            # A stray '&' in a password makes its tail a key: only a keyword's name is shown.
            return "a query parameter name is no libpq keyword (not shown: it may be a password)"
        try:
            parse_dsn(f"{key}=''")
        except ProgrammingError:
            return f"query parameter {key} is not a libpq connection parameter"
    return None
