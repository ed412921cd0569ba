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

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool

from db.settings import DbSettings

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
# URL query parameters that libpq also reads from the environment
_LIBPQ_QUERY_ENV = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "options": "PGOPTIONS",
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


def libpq_env(
    url: URL, application_name: str = APPLICATION_NAME, connect_timeout: int = 10
) -> dict[str, str]:
    """This process's environment minus any ``PG*`` it carries, plus ``url`` as libpq variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    query = {k: v if isinstance(v, str) else v[-1] for k, v in url.query.items()}
    host = query.pop("host", None) or url.host
    values = {
        "PGHOST": host,
        "PGPORT": str(url.port) if url.port else None,
        "PGUSER": url.username,
        "PGPASSWORD": url.password if isinstance(url.password, str) else None,
        "PGDATABASE": url.database,
        "PGAPPNAME": application_name,
        "PGCONNECT_TIMEOUT": str(connect_timeout),
    }
    for key, variable in _LIBPQ_QUERY_ENV.items():
        values[variable] = query.get(key)
    env.update({k: v for k, v in values.items() if v})
    return env


def backup_engine(
    settings: DbSettings, database: str | None = None, application_name: str = APPLICATION_NAME
) -> Engine:
    """A pool-less engine: backup jobs connect rarely and must not keep idle sessions open."""
    url = settings.url if database is None else settings.url.set(database=database)
    return create_engine(
        url,
        poolclass=NullPool,
        connect_args={
            "application_name": application_name,
            "connect_timeout": settings.connect_timeout,
        },
    )


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def first_error_line(stderr: str) -> str:
    """The line of a client program's stderr worth showing (the first error, else the last)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() or "fatal" in line.lower():
            return line
    return lines[-1] if lines else "no output"
