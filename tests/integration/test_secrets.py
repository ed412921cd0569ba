"""Secrets against the real server and real commands: a Unix-socket URL with its port in the
query reaches pg_dump and pg_restore, and no fragment of a password appears in command output,
error lines, manifests, /readyz, logs or the arguments of pg_dump that ``ps`` shows."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy.engine import URL

from ops.backup.manifest import Manifest
from ops.settings import load_settings
from tests.conftest import Server, env_for, run_ops
from tests.integration.backup_helpers import populate, run_held_by_lock
from tests.integration.test_daemon import sidecar, stop
from tests.unit.test_config_hostile import assert_no_fragment

WRONG = "Wq8Lz3Vt6Np1"  # a distinctive wrong password: none of its pieces occurs by chance


def plain_url(url: URL, **query: str) -> str:
    """``url`` as text with its password moved into the query (or replaced by ``query``)."""
    password = query.pop("password", str(url.password))
    base = URL.create(
        "postgresql", username=url.username, host=url.host, port=url.port, database=url.database
    )
    text = base.render_as_string(hide_password=False)
    items = "&".join(f"{k}={quote(v, safe='')}" for k, v in {**query, "password": password}.items())
    return f"{text}{'&' if '?' in text else '?'}{items}"


def socket_url(pg: Server, database: str) -> str:
    assert pg.cluster is not None
    return (
        f"postgresql://{pg.cluster.superuser}@/{database}"
        f"?host={quote(str(pg.cluster.socketdir), safe='')}&port={pg.cluster.port}"
    )


def test_backup_run_and_drill_reach_the_server_through_a_socket_url_with_port_in_query(
    pg: Server, migrated_db: URL, tmp_path: Path
) -> None:
    if pg.cluster is None:
        pytest.skip("needs the suite's own cluster and its socket directory")
    populate(migrated_db, rows=200)
    env = env_for(migrated_db, BACKUP_DIR=str(tmp_path))
    env["DATABASE_URL"] = socket_url(pg, str(migrated_db.database))

    ran = run_ops("backup", "run", "--json", env=env)
    assert ran.returncode == 0, ran.stderr
    backup = json.loads(ran.stdout)["backup"]
    assert backup["status"] == "ok", backup
    manifest = json.loads((tmp_path / f"{backup['id']}.json").read_text())
    assert manifest["tables"]["public.payload"] == 200

    drilled = run_ops("backup", "verify", "--drill", "--json", env=env)
    assert drilled.returncode == 0, drilled.stderr + drilled.stdout


def test_pg_dump_arguments_and_manifest_hold_no_password_from_the_query(
    pg: Server, migrated_db: URL, tmp_path: Path
) -> None:
    password = str(migrated_db.password)
    populate(migrated_db, rows=200)
    settings = load_settings({"DATABASE_URL": plain_url(migrated_db), "BACKUP_DIR": str(tmp_path)})
    assert settings.db.url.query["password"] == password
    with run_held_by_lock(migrated_db, tmp_path, settings) as held:
        pid = held.pg_dump_pid()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        shown = subprocess.run(
            ["ps", "-ww", "-o", "args=", "-p", str(pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    assert "pg_dump" in argv and "pg_dump" in shown
    assert_no_fragment(argv + shown, password)
    assert not held.error, held.error
    manifest: Manifest = held.result[0]
    assert manifest.status == "ok"  # the password in the query reached pg_dump
    for written in tmp_path.glob("*.json"):
        assert_no_fragment(written.read_text(), password)


@pytest.mark.parametrize("where", ["query", "userinfo"])
def test_failed_connection_error_line_shows_no_password(
    migrated_db: URL, tmp_path: Path, where: str
) -> None:
    if where == "query":
        url = plain_url(migrated_db, password=WRONG)
    else:
        url = migrated_db.set(drivername="postgresql", password=WRONG).render_as_string(
            hide_password=False
        )
    env = env_for(migrated_db, BACKUP_DIR=str(tmp_path))
    env["DATABASE_URL"] = url
    checked = run_ops("db", "check", env=env)
    assert checked.returncode == 1
    assert "password authentication failed" in checked.stderr
    assert_no_fragment(checked.stdout + checked.stderr, WRONG)

    backup = run_ops("backup", "run", env=env)
    assert backup.returncode == 1 and "Traceback" not in backup.stderr
    assert_no_fragment(backup.stdout + backup.stderr, WRONG)
    listed = run_ops("backup", "list", "--all", "--json", env=env)
    assert "password authentication failed" in listed.stdout
    for written in tmp_path.glob("*.json"):
        assert_no_fragment(written.read_text(), WRONG)


def test_ambiguous_url_is_refused_before_any_connection(migrated_db: URL, tmp_path: Path) -> None:
    password = "Wq8L@z3Vt/6Np1"
    url = f"postgresql://postgres:{password}@{migrated_db.host}:{migrated_db.port}/postgres"
    env = env_for(migrated_db, BACKUP_DIR=str(tmp_path))
    env["DATABASE_URL"] = url
    for command in (["db", "check"], ["backup", "run"], ["config", "validate"], ["config", "show"]):
        result = run_ops(*command, env=env)
        assert result.returncode == 2, (command, result.stderr)
        assert "percent-encode" in result.stderr
        assert_no_fragment(result.stdout + result.stderr, password)
    assert not list(tmp_path.iterdir())  # nothing ran


def test_config_show_and_validate_redact_query_and_userinfo_passwords(migrated_db: URL) -> None:
    env = env_for(migrated_db)
    env["DATABASE_URL"] = plain_url(migrated_db, password=WRONG, sslmode="disable")
    env["MONITOR_DATABASE_URL"] = (
        f"postgresql://mon:Mz4pLq8Wn3Ys@{migrated_db.host}:{migrated_db.port}/postgres"
    )
    for command in (["config", "show"], ["config", "show", "--json"], ["config", "validate"]):
        result = run_ops(*command, env=env)
        assert result.returncode == 0, result.stderr
        assert_no_fragment(result.stdout + result.stderr, WRONG, "Mz4pLq8Wn3Ys")
    shown = json.loads(run_ops("config", "show", "--json", env=env).stdout)
    assert "password=***" in shown["db"]["url"]
    assert shown["sidecar"]["monitor_url"].startswith("postgresql+psycopg2://mon:***@")


def test_sidecar_logs_readyz_and_metrics_hold_no_query_password(migrated_db: URL) -> None:
    wrong = URL.create(
        "postgresql+psycopg2",
        username=migrated_db.username,
        host=migrated_db.host,
        port=migrated_db.port,
        database=migrated_db.database,
        query={"password": WRONG},
    )
    with sidecar(wrong) as running:
        status, body = running.get("/readyz")
        assert status == 503 and "password authentication failed" in body
        assert_no_fragment(body, WRONG)
        metrics = running.get("/metrics")[1]
        assert "dbops_pg_up 0.0" in metrics
        assert_no_fragment(metrics + running.get("/healthz")[1], WRONG)
        assert stop(running.process) == 0
        log = running.stderr()
    assert "exporter connects to" in log and "password=***" in log
    assert_no_fragment(log, WRONG)
