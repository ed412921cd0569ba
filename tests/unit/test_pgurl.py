"""db.pgurl reads URL text where SQLAlchemy's make_url does, and the short CLI path stays free
of SQLAlchemy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from db.pgurl import PgUrl, parse_url, sqlalchemy_url
from db.settings import DbSettings

REPO = Path(__file__).resolve().parents[2]
DECODES_DATABASE = tuple(int(p) for p in sqlalchemy.__version__.split(".")[:2]) >= (2, 1)

TEXTS = [
    "postgresql://u:p@h:5432/db",
    "postgresql+psycopg2://u@h/db?sslmode=require&host=/tmp&host=/run",
    "postgresql://u:p%40ss@[::1]:5433/db",
    "postgresql://u:p@[fe80::1%25eth0]/db",
    "postgresql:///db?host=/var/run/postgresql",
    "postgres://h/db",
    "postgresql://u:@h/db",
    "postgresql://@h/db",
    "postgresql://u:p@h:/db",
    "postgresql://u:p@h",
    "postgresql://u:p@h/",
    "postgresql://h?sslmode=disable",
    "postgresql://u:p@h/db?a=1&a=2&b=",
    "postgresql://us er:pa ss@h/d b",
    "postgresql://u:p:q@h/db",
    "postgresql://u%3Ax:p%2Fq@h/db?application_name=x%26y&options=-c%20a%3Db",
    "postgresql://u:p@h/db?",
    "postgresql+psycopg2://u:p@h1,h2:5432/db",
    "postgresql://u:p@h/my%20db",
    "postgresql://u:p@h/d%2541b",
    "postgresql://u:p@h:5432:6543/db",
    "postgresql://u:p@h:abc/db",
    "postgresql://u:p@h: 5/db",
    "postgresql://u:p@[::1/db",
    "postgresql:/h/db",
    "://h/db",
    "not a url",
    "",
]
STRICTER = {"postgresql://u:p@h: 5/db"}  # int(" 5") is 5 to SQLAlchemy; a port is digits here


def _sqlalchemy_parts(text: str) -> tuple[object, ...] | None:
    try:
        url = make_url(text)
        port = url.port
    except (ArgumentError, ValueError):
        return None
    database = url.database
    if database is not None and not DECODES_DATABASE:
        database = unquote(database)  # what 2.1 and libpq make of it
    return (
        url.drivername,
        url.username,
        url.password,
        url.host,
        port,
        database,
        dict(url.query),
    )


@pytest.mark.parametrize("text", TEXTS)
def test_parts_are_sqlalchemy_s(text: str) -> None:
    expected = _sqlalchemy_parts(text)
    if expected is None or text in STRICTER:
        with pytest.raises(ValueError):
            parse_url(text)
        return
    url = parse_url(text)
    parts = (url.drivername, url.username, url.password, url.host, url.port, url.database)
    assert (*parts, dict(url.query)) == expected


@pytest.mark.parametrize(
    "text", [t for t in TEXTS if _sqlalchemy_parts(t) and t not in STRICTER and "%" not in t]
)
def test_handed_to_sqlalchemy_and_shown_as_it_does(text: str) -> None:
    url = parse_url(text)
    assert url.sqlalchemy() == make_url(text)
    assert sqlalchemy_url(url) == make_url(text)
    assert url.render_as_string() == make_url(text).render_as_string(hide_password=True)
    assert url.render_as_string(hide_password=False) == make_url(text).render_as_string(
        hide_password=False
    )


def test_password_hidden_in_repr_and_str_forms() -> None:
    url = parse_url("postgresql://u:s3cret-pw@h/db")
    assert "s3cret-pw" not in repr(url) and "s3cret-pw" not in str(url)
    assert "s3cret-pw" in url.render_as_string(hide_password=False)


def test_set_and_query() -> None:
    url = parse_url("postgresql://u:p@h/db?host=/a&host=/b&sslmode=require")
    assert url.query == {"host": ("/a", "/b"), "sslmode": "require"}
    moved = url.set(database="other", query={"sslmode": "disable"})
    assert (moved.database, dict(moved.query), url.database) == (
        "other",
        {"sslmode": "disable"},
        "db",
    )
    assert url.set(drivername="postgresql+psycopg2").get_backend_name() == "postgresql"
    with pytest.raises(TypeError):
        url.query["sslmode"] = "disable"  # type: ignore[index]


def test_settings_take_a_sqlalchemy_url_as_the_same_parts() -> None:
    given = make_url("postgresql+psycopg2://u:p@h:5433/db?sslmode=require")
    settings = DbSettings(url=given)  # type: ignore[arg-type]
    assert isinstance(settings.url, PgUrl)
    assert settings.url.sqlalchemy() == given
    assert PgUrl.of(settings.url) is settings.url


@pytest.mark.parametrize(
    ("command", "modules"),
    [
        ("backup", "ops.backup.lock, ops.backup.prune, ops.backup.runner"),
        ("pitr", "ops.commands.pitr, ops.pitr.barman, ops.pitr.restore, ops.pitr.status"),
    ],
)
def test_backup_and_restore_commands_load_no_sqlalchemy(
    tmp_path: Path, command: str, modules: str
) -> None:
    """What `ops backup run` imports before pg_dump starts, and `ops pitr backup | restore`
    before Barman starts: the command module, the settings (every section checked) and what
    runs the command. SQLAlchemy alone cost about 0.2 s of each run."""
    code = (
        "import sys\n"
        "from ops.cli import build_parser\n"
        f"build_parser({command!r})\n"
        "from ops.settings import load_settings\n"
        "load_settings()\n"
        f"import {modules}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sqlalchemy'))\n"
    )
    env = {
        "PATH": os.environ["PATH"],
        "DATABASE_URL": "postgresql://backup:pw@db.internal:5432/app?sslmode=require",
        "MONITOR_DATABASE_URL": "postgresql://monitor:pw@db.internal:5432/app",
        "BACKUP_DIR": str(tmp_path / "backups"),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
