"""A database URL as the settings hold it, read and written without importing SQLAlchemy.

Every ``ops`` command reads the settings, the short scheduled ones included, and importing
SQLAlchemy only to split a URL cost about 0.2 s of each call. :func:`parse_url` splits URL text
where SQLAlchemy's ``make_url`` does (userinfo up to the first ``@`` after an optional ``:``,
then host, port, path and query), so the ambiguity checks of :mod:`db.urls` keep describing
what the engines will use; :meth:`PgUrl.sqlalchemy` hands the parts to SQLAlchemy where an
engine is made. :class:`PgUrl` has the read side of SQLAlchemy's ``URL`` (``drivername``,
``username``, ``password``, ``host``, ``port``, ``database``, ``query``, ``set()``,
``get_backend_name()``, ``render_as_string()``), so code that takes one takes the other.

The user name, password and database name are percent-decoded, as libpq does (and SQLAlchemy
2.1; 2.0 left the database name encoded). A port must be ASCII digits (SQLAlchemy takes
`` 5`` for 5).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

QueryValue = str | tuple[str, ...]

_URL = re.compile(
    r"""
    (?P<driver>[\w+]+)://
    (?:(?P<username>[^:/]*)(?::(?P<password>[^@]*))?@)?
    (?:\[(?P<bracketed>[^/?]+)\]|(?P<host>[^/:?]+))?
    (?::(?P<port>[^/?]*))?
    (?:/(?P<database>[^?]*))?
    (?:\?(?P<query>.*))?
    """,
    re.VERBOSE,
)


@dataclass(frozen=True, repr=False)
class PgUrl:
    """The parts of a database URL; ``query`` values are a string, or a tuple when repeated."""

    drivername: str
    username: str | None = None
    password: str | None = None
    host: str | None = None
    port: int | None = None
    database: str | None = None
    items: tuple[tuple[str, QueryValue], ...] = field(default=())

    @classmethod
    def create(
        cls,
        drivername: str,
        username: str | None = None,
        password: str | None = None,
        host: str | None = None,
        port: int | None = None,
        database: str | None = None,
        query: Mapping[str, QueryValue | list[str]] | None = None,
    ) -> PgUrl:
        return cls(drivername, username, password, host, port, database, _items(query or {}))

    @classmethod
    def of(cls, url: Any) -> PgUrl:
        """``url`` as a :class:`PgUrl`: itself, or a copy of a SQLAlchemy ``URL``'s parts."""
        if isinstance(url, PgUrl):
            return url
        password = url.password
        return cls.create(
            url.drivername,
            url.username,
            None if password is None else str(password),
            url.host,
            url.port,
            url.database,
            dict(url.query),
        )

    @property
    def query(self) -> Mapping[str, QueryValue]:
        return MappingProxyType(dict(self.items))

    def set(self, **changes: Any) -> PgUrl:
        """A copy with the given parts replaced (``query=`` takes a mapping)."""
        if "query" in changes:
            changes["items"] = _items(changes.pop("query") or {})
        return replace(self, **changes)

    def get_backend_name(self) -> str:
        return self.drivername.partition("+")[0]

    def render_as_string(self, hide_password: bool = True) -> str:
        text = f"{self.drivername}://"
        if self.username is not None:
            text += quote(self.username, safe=" +")
            if self.password is not None:
                text += ":" + ("***" if hide_password else quote(self.password, safe=" +"))
            text += "@"
        if self.host is not None:
            text += f"[{self.host}]" if ":" in self.host else self.host
        if self.port is not None:
            text += f":{self.port}"
        if self.database is not None:
            text += "/" + quote(self.database, safe=" +/")
        if self.items:
            text += "?" + "&".join(
                f"{quote_plus(key)}={quote_plus(value)}"
                for key, values in sorted(self.items)
                for value in ((values,) if isinstance(values, str) else values)
            )
        return text

    def __repr__(self) -> str:
        return self.render_as_string(hide_password=True)

    def sqlalchemy(self) -> URL:
        """The same URL as SQLAlchemy's type, for an engine (imports SQLAlchemy)."""
        from sqlalchemy.engine import URL

        return URL.create(
            self.drivername,
            self.username,
            self.password,
            self.host,
            self.port,
            self.database,
            dict(self.items),
        )


def parse_url(text: str) -> PgUrl:
    """The parts of ``driver://user:password@host:port/database?key=value``; ``ValueError``
    when the text is no such URL."""
    match = _URL.fullmatch(text)
    if match is None:
        raise ValueError("not a database URL")
    parts = match.groupdict()
    port = parts["port"]
    if port is not None and not (port.isascii() and port.isdigit()):
        raise ValueError("the port is not a number")
    query: dict[str, list[str]] = {}
    for key, value in parse_qsl(parts["query"] or ""):
        query.setdefault(key, []).append(value)
    return PgUrl.create(
        parts["driver"],
        _decoded(parts["username"]),
        _decoded(parts["password"]),
        parts["host"] or parts["bracketed"],
        int(port) if port else None,
        _decoded(parts["database"]),
        query,
    )


def sqlalchemy_url(url: PgUrl | URL) -> URL:
    """SQLAlchemy's ``URL`` for either kind: settings built by hand may hold one already."""
    return url.sqlalchemy() if isinstance(url, PgUrl) else url


def _decoded(part: str | None) -> str | None:
    return None if part is None else unquote(part)


def _items(query: Mapping[str, QueryValue | list[str]]) -> tuple[tuple[str, QueryValue], ...]:
    items: list[tuple[str, QueryValue]] = []
    for key, value in query.items():
        if isinstance(value, str):
            items.append((key, value))
        else:
            values = tuple(value)
            items.append((key, values[0] if len(values) == 1 else values))
    return tuple(items)
