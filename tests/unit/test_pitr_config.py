"""PITR settings are validated with the rest, and Barman's configuration is generated from them
without ever holding the password."""

from __future__ import annotations

import configparser
import stat
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from db.settings import ConfigError
from ops.pitr.config import (
    barman_config,
    barman_environment,
    conninfo,
    passfile_text,
    write_private,
)
from ops.pitr.settings import PitrSettings, parse_size
from ops.settings import load_settings

BAD_PITR_VALUES = {
    "PITR_ENABLED": "sometimes",
    "PITR_DIR": "relative/dir",
    "PITR_BASEBACKUP_SCHEDULE": "daily",
    "PITR_DRILL_SCHEDULE": "0 25 * * *",
    "PITR_RETENTION": "36h",
    "PITR_MIN_REDUNDANCY": "0",
    "PITR_ARCHIVE_TIMEOUT": "500ms",
    "PITR_MAX_SLOT_WAL_KEEP_SIZE": "-1",
    "PITR_DRILL_SOURCE": "tape",
    "PITR_SLOT_NAME": "Bad-Slot",
    "PITR_STREAMING_DOWN_LIMIT": "99999999d",
    "PITR_CRON_INTERVAL": "1s",
    "PITR_RECOVERY_JOBS": "0",
    "PITR_BARMAN": "/nonexistent/barman",
}
SECRET = "s3cr%t:pa\\ss'word"


def problems_for(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    return caught.value.problems


def test_pitr_dir_with_a_colon_is_refused_as_it_leads_barmans_path() -> None:
    assert problems_for({"PITR_DIR": "/var/lib/dbops:/tmp/evil"}) == [
        "PITR_DIR /var/lib/dbops:/tmp/evil: must not contain ':' (it goes into a PATH)"
    ]


def url(password: str = SECRET, **parts: object) -> URL:
    values: dict[str, object] = {
        "username": "dbops_backup",
        "host": "db.internal",
        "port": 5433,
        "database": "dbops",
    }
    values.update(parts)
    return URL.create("postgresql+psycopg2", password=password, **values)  # type: ignore[arg-type]


def test_every_bad_pitr_value_is_reported_at_once() -> None:
    problems = problems_for(BAD_PITR_VALUES)
    for name in BAD_PITR_VALUES:
        assert any(p.startswith(f"{name} ") for p in problems), (name, problems)
    assert "PITR_RETENTION 36h: must be whole days from 1d to 3650d" in problems


def test_pitr_defaults_are_off_with_a_week_of_recovery_window() -> None:
    pitr = load_settings({}).pitr
    assert (pitr.enabled, pitr.retention_days, pitr.min_redundancy) == (False, 7, 1)
    assert pitr.archive_timeout == 60.0
    assert pitr.max_slot_wal_keep_size == 10 * 1024**3
    assert pitr.recovery_jobs == 2


def test_enabling_pitr_without_barman_installed_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # shutil.which reads the process's PATH
    problems = problems_for({"PITR_ENABLED": "true"})
    assert any(p.startswith("PITR_ENABLED true: barman is not installed") for p in problems)


def test_enabled_pitr_refuses_a_password_a_passfile_cannot_hold(tmp_path: Path) -> None:
    barman = tmp_path / "barman"
    barman.write_text("")
    problems = problems_for(
        {"PITR_ENABLED": "1", "PITR_BARMAN": str(barman), "POSTGRES_PASSWORD": "two\nlines"}
    )
    assert problems == [
        "PITR_ENABLED true: the database password contains a line break, which a passfile "
        "cannot hold; Barman cannot be given this login"
    ]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MB", 512 * 1024**2),
        ("10GB", 10 * 1024**3),
        ("65536kB", 64 * 1024**2),
        ("100", 100 << 20),
    ],
)
def test_slot_cap_reads_postgres_size_units(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_retention_in_weeks_becomes_days() -> None:
    assert load_settings({"PITR_RETENTION": "2w"}).pitr.retention_days == 14


def generated(password: str = SECRET, **parts: object) -> str:
    settings = PitrSettings(enabled=True, directory=Path("/var/lib/dbops/pitr%x"))
    return barman_config(
        settings, url(password, **parts), os_user="dbops", path_prefix="/usr/lib/postgresql/17/bin"
    )


def test_barman_config_never_holds_the_password() -> None:
    text = generated()
    assert SECRET not in text
    assert "s3cr" not in text and "password" not in text


def test_barman_reads_back_exactly_the_values_we_generated() -> None:
    """Barman's ConfigParser interpolates ``%``: the text must survive that unchanged."""
    parser = configparser.ConfigParser()
    parser.read_string(generated(database="db%name"))
    assert parser.get("barman", "barman_home") == "/var/lib/dbops/pitr%x/barman"
    server = parser["dbops"]
    assert "dbname='db%name'" in server["conninfo"]
    assert server["retention_policy"] == "RECOVERY WINDOW OF 7 DAYS"
    assert server["minimum_redundancy"] == "1"
    assert (server["streaming_archiver"], server["archiver"]) == ("on", "off")
    assert server["path_prefix"] == "/usr/lib/postgresql/17/bin"
    assert server["parallel_jobs"] == "2"


def test_recovery_jobs_reach_barmans_parallel_jobs() -> None:
    pitr = load_settings({"PITR_RECOVERY_JOBS": "4"}).pitr
    assert pitr.recovery_jobs == 4
    text = barman_config(pitr, url(), os_user="dbops", path_prefix=None)
    assert "\nparallel_jobs = 4\n" in text
    assert problems_for({"PITR_RECOVERY_JOBS": "33"}) == ["PITR_RECOVERY_JOBS 33: must be <= 32"]


def test_conninfo_quotes_hostile_values_as_one_libpq_value() -> None:
    text = conninfo(url(username="o'brien\\x host=evil", host="db"), "dbops-barman")
    assert "user='o\\'brien\\\\x host=evil'" in text
    assert text.count("host=") == 2  # ours, and the one inside the quoted user name


def test_conninfo_refuses_a_line_break_that_would_forge_config_lines() -> None:
    with pytest.raises(ValueError, match="control character"):
        conninfo(url(database="dbops\nconninfo = host=evil"), "dbops-barman")


def test_unix_socket_host_and_ssl_mode_from_the_url_query_reach_the_conninfo() -> None:
    socket_url = URL.create(
        "postgresql+psycopg2",
        username="u",
        database="d",
        query={"host": "/run/postgresql", "sslmode": "disable"},
    )
    text = conninfo(socket_url, "x")
    assert "host='/run/postgresql'" in text and "sslmode='disable'" in text


def test_passfile_escapes_colons_and_backslashes() -> None:
    assert passfile_text(url("a:b\\c", username="u:v")) == "*:*:*:u\\:v:a\\:b\\\\c\n"


def test_private_files_are_owner_only_and_replace_a_planted_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("keep me")
    target = tmp_path / "pitr" / "pgpass"
    target.parent.mkdir()
    target.symlink_to(outside)
    write_private(target, "*:*:*:u:pw\n")
    assert outside.read_text() == "keep me"
    assert not target.is_symlink() and target.read_text() == "*:*:*:u:pw\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_barman_runs_with_the_passfile_and_none_of_our_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", SECRET)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://u:{SECRET}@h/d")
    monkeypatch.setenv("PGPASSWORD", SECRET)
    env = barman_environment(PitrSettings(directory=Path("/p")))
    assert env["PGPASSFILE"] == "/p/pgpass"
    assert all(SECRET not in value for value in env.values())


def test_check_fails_when_a_slot_may_keep_unlimited_wal() -> None:
    from ops.pitr.checks import our_checks
    from ops.pitr.status import PitrStatus, SlotState

    status = PitrStatus(gathered_at=0.0, current_lsn="0/3000000", cap_bytes=None)
    status.slot = SlotState(name="dbops_barman", exists=True, wal_status="reserved")
    checks = our_checks(status)
    assert checks["dbops_slot_cap"]["status"] == "FAILED"
    assert "unlimited" in checks["dbops_slot_cap"]["hint"]
    assert checks["dbops_slot"]["status"] == "OK"


def test_check_reports_a_lost_slot_as_a_gap_in_the_archive() -> None:
    from ops.pitr.checks import our_checks
    from ops.pitr.status import PitrStatus, SlotState

    status = PitrStatus(gathered_at=0.0, current_lsn="0/9000000", cap_bytes=64 * 1024**2)
    status.slot = SlotState(name="dbops_barman", exists=True, wal_status="lost")
    assert our_checks(status)["dbops_slot"] == {
        "status": "FAILED",
        "hint": "slot dbops_barman lost its WAL: the archive has a gap",
    }
