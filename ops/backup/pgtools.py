"""The PostgreSQL client programs: where they are, which version, and how to talk to them.

Connection details reach ``pg_dump``/``pg_restore`` through libpq's environment variables, never
argv: the password would otherwise be readable by anyone on the host through ``ps`` or
``/proc/<pid>/cmdline``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from db.pgurl import PgUrl, sqlalchemy_url
from db.redact import redact
from db.settings import DbSettings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

APPLICATION_NAME = "dbops-backup"  # the run's own session: version check, snapshot, row counts
DUMP_APPLICATION_NAME = "dbops-pg_dump"  # pg_dump and its --jobs workers
VERIFY_APPLICATION_NAME = "dbops-verify"
RESTORE_APPLICATION_NAME = "dbops-restore"
# Sessions whose long transactions are the job itself (pg_dump holds one for a whole dump).
OWN_APPLICATION_NAMES = (
    APPLICATION_NAME,
    DUMP_APPLICATION_NAME,
    VERIFY_APPLICATION_NAME,
    RESTORE_APPLICATION_NAME,
)
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
# libpq's connection keywords and the environment variables that carry them to pg_dump and
# pg_restore (https://www.postgresql.org/docs/current/libpq-envars.html). A keyword without a
# variable (keepalives, say) reaches the run's own connection only.
_LIBPQ_ENV = {
    "host": "PGHOST",
    "port": "PGPORT",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "dbname": "PGDATABASE",
    "application_name": "PGAPPNAME",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "hostaddr": "PGHOSTADDR",
    "passfile": "PGPASSFILE",
    "channel_binding": "PGCHANNELBINDING",
    "options": "PGOPTIONS",
    "client_encoding": "PGCLIENTENCODING",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "sslcertmode": "PGSSLCERTMODE",
    "requirepeer": "PGREQUIREPEER",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "gssencmode": "PGGSSENCMODE",
    "gsslib": "PGGSSLIB",
    "krbsrvname": "PGKRBSRVNAME",
    "require_auth": "PGREQUIREAUTH",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
}


class ToolError(Exception):
    """A client program is missing, too old, or failed; the message says which and why."""


@dataclass(frozen=True)
class ClientTool:
    name: str
    path: str
    version: str
    major: int


def find_tool(name: str, bindir: Path | None) -> ClientTool:
    """``name`` from ``PG_BINDIR`` if set, else from PATH, with its version."""
    if bindir is not None:
        candidate = bindir / name
        path = str(candidate) if candidate.is_file() else None
    else:
        path = shutil.which(name)
    if path is None:
        where = f"in PG_BINDIR {bindir}" if bindir else "on PATH (set PG_BINDIR)"
        raise ToolError(f"{name} not found {where}")
    stat = os.stat(path)
    return _tool_version(name, path, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=16)
def _tool_version(name: str, path: str, mtime_ns: int, inode: int) -> ClientTool:
    """Cached per binary file: a package upgrade changes mtime/inode and so the answer."""
    result = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    match = _VERSION.search(result.stdout)
    if result.returncode != 0 or not match:
        raise ToolError(f"{path} --version failed: {(result.stderr or result.stdout).strip()}")
    return ClientTool(name, path, result.stdout.strip(), int(match.group(1)))


def check_client_version(tool: ClientTool, server_version_num: int) -> None:
    """A client older than the server cannot read its catalogs: refuse before starting."""
    server_major = server_version_num // 10000
    if tool.major < server_major:
        raise ToolError(
            f"{tool.name} {tool.major} ({tool.path}) is older than the PostgreSQL {server_major} "
            f"server; install the PostgreSQL {server_major} client tools or set PG_BINDIR"
        )


def libpq_params(
    url: PgUrl, application_name: str = APPLICATION_NAME, connect_timeout: int = 10
) -> dict[str, str]:
    """``url`` as libpq connection keywords: for ``psycopg2.connect`` and, through
    :func:`libpq_env`, for the client programs, so both reach the same server the same way.

    What the URL's query says wins over its other parts, as it does for the pool's connections
    (SQLAlchemy hands the query to libpq last): ``postgresql://user@/db?host=/run/pg&port=5433``
    reaches the socket ``/run/pg/.s.PGSQL.5433``, not the default port's. The application name
    and connect timeout given here win over the query's, as an engine's ``connect_args`` do.
    """
    query = {k: [v] if isinstance(v, str) else list(v) for k, v in url.query.items()}
    hosts, ports = _hosts_and_ports(query.pop("host", []))
    params = {key: values[-1] for key, values in query.items() if values}
    params.update(
        {
            "host": hosts or url.host or "",
            "port": _last(query, "port") or ports or (str(url.port) if url.port else ""),
            "user": _last(query, "user") or url.username or "",
            "password": _last(query, "password")
            or (url.password if isinstance(url.password, str) else ""),
            "dbname": url.database or "",
            "application_name": application_name,
            "connect_timeout": str(connect_timeout),
        }
    )
    return {key: value for key, value in params.items() if value}


def libpq_env(
    url: PgUrl, application_name: str = APPLICATION_NAME, connect_timeout: int = 10
) -> dict[str, str]:
    """This process's environment minus any ``PG*`` it carries, plus :func:`libpq_params`
    as libpq's variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    params = libpq_params(url, application_name, connect_timeout)
    env.update({_LIBPQ_ENV[key]: value for key, value in params.items() if key in _LIBPQ_ENV})
    return env


def _last(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[-1] if values else None


def _hosts_and_ports(values: list[str]) -> tuple[str | None, str | None]:
    """SQLAlchemy's multi-host form (``?host=h1:5432&host=h2:5433``) as libpq's lists
    (``PGHOST=h1,h2 PGPORT=5432,5433``); a single ``host=`` (a socket directory) as it is."""
    if len(values) <= 1:
        return (values[0] if values else None), None
    hosts, ports = [], []
    for value in values:
        host, colon, port = value.rpartition(":")
        if colon and port.isdigit() and not value.startswith("/"):
            hosts.append(host)
            ports.append(port)
        else:
            hosts.append(value)
            ports.append("")
    return ",".join(hosts), (",".join(ports) if any(ports) else None)


def backup_engine(
    settings: DbSettings, database: str | None = None, application_name: str = APPLICATION_NAME
) -> Engine:
    """A pool-less engine: backup jobs connect rarely and must not keep idle sessions open."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    url = settings.url if database is None else settings.url.set(database=database)
    return create_engine(
        sqlalchemy_url(url),
        poolclass=NullPool,
        connect_args={
            "application_name": application_name,
            "connect_timeout": settings.connect_timeout,
        },
    )


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def first_error_line(stderr: str) -> str:
    """The line of a client program's stderr worth showing (the first error, else the last),
    any password in it redacted."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() or "fatal" in line.lower():
            return redact(line)
    return redact(lines[-1]) if lines else "no output"
