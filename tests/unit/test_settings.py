"""Configuration is validated up front: every problem at once, secrets never echoed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from db.settings import ConfigError, load_db_settings
from ops.cli import main
from ops.settings import load_settings

# One bad value for every variable the settings read, with the reason they must produce.
BAD_VALUES = {
    "DATABASE_URL": "notaurl",
    "DB_POOL_SIZE": "-1",
    "DB_MAX_OVERFLOW": "lots",
    "DB_POOL_TIMEOUT": "0",
    "DB_POOL_RECYCLE": "-5",
    "DB_POOL_PRE_PING": "maybe",
    "DB_APPLICATION_NAME": "x" * 64,
    "DB_CONNECT_TIMEOUT": "0",
    "DB_STATEMENT_TIMEOUT": "soon",
    "DB_WAIT_TIMEOUT": "forever",
    "ADMIN_USERNAME": "Admin",
    "APP_DB_USER": "App-User",
    "MONITOR_DB_USER": "pg_monitor",
    "BACKUP_DB_USER": "1backup",
    "BACKUP_SCHEDULE": "nonsense",
    "BACKUP_VERIFY_SCHEDULE": "61 * * * *",
    "BACKUP_FORMAT": "zip",
    "BACKUP_COMPRESSION": "brotli",
    "BACKUP_JOBS": "0",
    "BACKUP_KEEP_LAST": "0",
    "BACKUP_KEEP_DAILY": "-1",
    "BACKUP_KEEP_WEEKLY": "many",
    "BACKUP_KEEP_MONTHLY": "-2",
    "BACKUP_MAX_AGE": "10s",
    "OPS_LISTEN": "nowhere",
    "OPS_LOG_FORMAT": "xml",
    "OPS_LOG_LEVEL": "loud",
    "OPS_QUERY_TIMEOUT": "0",
    "OPS_LOCK_TIMEOUT": "never",
    "OPS_COLLECTOR_TTL": "0.5",
    "OPS_TOP_N": "0",
    "OPS_POOL_SIZE": "100",
}
SECRET_VALUES = {
    "ADMIN_PASSWORD": "short-pw",
    "APP_DB_PASSWORD": "tiny-app",
    "MONITOR_DB_PASSWORD": "tiny-mon",
    "BACKUP_DB_PASSWORD": "tiny-bak",
}


def problems_for(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    return caught.value.problems


def test_every_bad_value_is_reported_at_once() -> None:
    problems = problems_for({**BAD_VALUES, **SECRET_VALUES})
    for name in [*BAD_VALUES, *SECRET_VALUES]:
        assert any(p.startswith(f"{name} ") for p in problems), (name, problems)


def test_problems_read_variable_value_reason() -> None:
    problems = problems_for({"DB_POOL_SIZE": "-1", "BACKUP_FORMAT": "zip"})
    assert "DB_POOL_SIZE -1: must be >= 1" in problems
    assert "BACKUP_FORMAT zip: must be one of custom, directory" in problems


def test_postgres_port_is_checked_when_no_url_is_given() -> None:
    problems = problems_for({"POSTGRES_PORT": "70000", "POSTGRES_HOST": "db"})
    assert problems == ["POSTGRES_PORT 70000: must be <= 65535"]


def test_secret_values_are_never_echoed_in_problems() -> None:
    environ = {
        **SECRET_VALUES,
        "POSTGRES_PASSWORD": "pg-secret-value",
        "DATABASE_URL": "postgresql://someone:url-secret-pw@db.internal:5432",
    }
    problems = problems_for(environ)
    text = "\n".join(problems)
    for secret in [*SECRET_VALUES.values(), "url-secret-pw"]:
        assert secret not in text
    assert "ADMIN_PASSWORD ***: must be at least 12 characters" in problems
    assert any(p.startswith("DATABASE_URL postgresql://someone:***@db.internal") for p in problems)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://someone:url-secret-pw@db/app",
        "postgresql://someone:url-secret-pw@db:port/app",
        "postgresql://someone:url-secret-pw@db/",
    ],
)
def test_rejected_database_urls_hide_their_password(url: str) -> None:
    problems = problems_for({"DATABASE_URL": url})
    assert len(problems) == 1 and problems[0].startswith("DATABASE_URL ")
    assert "url-secret-pw" not in problems[0]


def test_secrets_are_read_from_file_variables(tmp_path: Path) -> None:
    (tmp_path / "admin").write_text("an admin password long enough\n")
    (tmp_path / "pg").write_text("p@ss:w/ord%\n")
    (tmp_path / "app").write_text("application role secret")
    settings = load_settings(
        {
            "ADMIN_PASSWORD_FILE": str(tmp_path / "admin"),
            "POSTGRES_PASSWORD_FILE": str(tmp_path / "pg"),
            "APP_DB_PASSWORD_FILE": str(tmp_path / "app"),
        }
    )
    assert settings.seed.admin_password == "an admin password long enough"
    assert settings.seed.app_db_password == "application role secret"
    assert settings.db.url.password == "p@ss:w/ord%"


def test_secret_and_its_file_together_are_a_problem(tmp_path: Path) -> None:
    (tmp_path / "admin").write_text("an admin password long enough")
    problems = problems_for(
        {
            "ADMIN_PASSWORD": "another long admin password",
            "ADMIN_PASSWORD_FILE": str(tmp_path / "admin"),
            "MONITOR_DB_PASSWORD_FILE": str(tmp_path / "missing"),
        }
    )
    assert any(
        p.startswith(f"ADMIN_PASSWORD_FILE {tmp_path / 'admin'}: set together with ADMIN_PASSWORD")
        for p in problems
    )
    assert any(
        p.startswith(f"MONITOR_DB_PASSWORD_FILE {tmp_path / 'missing'}: cannot read")
        for p in problems
    )
    assert not any("another long admin password" in p for p in problems)


def test_role_names_must_differ() -> None:
    problems = problems_for({"APP_DB_USER": "shared", "BACKUP_DB_USER": "shared"})
    assert any("three different roles" in p for p in problems)


def test_defaults_match_the_seed() -> None:
    settings = load_settings({})
    db = settings.db
    assert (db.pool_size, db.max_overflow, db.pool_timeout, db.pool_recycle, db.pool_pre_ping) == (
        20,
        40,
        30.0,
        3600,
        True,
    )
    assert settings.seed.wait_timeout == 60.0
    assert (settings.seed.app_db_user, settings.seed.monitor_db_user) == (
        "dbops_app",
        "dbops_monitor",
    )
    assert settings.seed.backup_db_user == "dbops_backup"
    assert settings.seed.app_db_password is None


def test_database_url_wins_and_is_normalised_to_psycopg2() -> None:
    settings = load_db_settings({"DATABASE_URL": "postgres://u:pw@h:6543/app"})
    assert settings.url.drivername == "postgresql+psycopg2"
    assert (settings.url.host, settings.url.port, settings.url.database) == ("h", 6543, "app")
    assert settings.redacted_url == "postgresql+psycopg2://u:***@h:6543/app"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith(("DATABASE_", "POSTGRES_", "DB_", "BACKUP_", "OPS_", "ADMIN_")) or (
            name.endswith(("_DB_USER", "_DB_PASSWORD", "_DB_PASSWORD_FILE"))
        ):
            monkeypatch.delenv(name)
    return monkeypatch


def test_config_validate_lists_all_three_problems_and_exits_2(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("DB_POOL_SIZE", "-1")
    clean_env.setenv("BACKUP_SCHEDULE", "nonsense")
    clean_env.setenv("DATABASE_URL", "notaurl")
    assert main(["config", "validate"]) == 2
    err = capsys.readouterr().err
    assert "DB_POOL_SIZE -1: must be >= 1" in err
    assert "BACKUP_SCHEDULE nonsense: must be a 5-field cron expression" in err
    assert "DATABASE_URL ***: not a database URL" in err

    assert main(["config", "validate", "--json"]) == 2
    shown = json.loads(capsys.readouterr().out)
    assert shown["valid"] is False and len(shown["problems"]) == 3


def test_config_validate_accepts_a_good_environment(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("DATABASE_URL", "postgresql://u:pw@localhost/app")
    assert main(["config", "validate"]) == 0
    assert "configuration is valid" in capsys.readouterr().out


def test_config_show_redacts_every_secret(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets = {
        "POSTGRES_PASSWORD": "postgres-password-1",
        "ADMIN_PASSWORD": "admin-password-1234",
        "APP_DB_PASSWORD": "app-password-1234",
        "MONITOR_DB_PASSWORD": "monitor-password-1234",
        "BACKUP_DB_PASSWORD": "backup-password-1234",
    }
    for name, value in secrets.items():
        clean_env.setenv(name, value)
    for flag in ([], ["--json"]):
        assert main(["config", "show", *flag]) == 0
        out = capsys.readouterr().out
        for value in secrets.values():
            assert value not in out
        assert "***" in out
