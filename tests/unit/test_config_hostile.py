"""Hostile and careless configuration: every problem listed at once with exit 2, and no
fragment of any password in anything printed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from db.redact import redact, redact_unparsed_url
from db.settings import ConfigError, load_db_settings
from ops.backup.pgtools import libpq_env
from ops.cli import main
from ops.logs import JsonFormatter, TextFormatter, setup_logging
from ops.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
# Distinctive passwords: none of their 4-character pieces occurs in any message by chance.
PASSWORD = "Qx7vKw2Zr9Tj"
PASSWORDS_WITH = {
    "@": "Qx7v@Kw2Zr9Tj",
    ":": "Qx7v:Kw2Zr9Tj",
    "/": "Qx7v/Kw2Zr9Tj",
    "#": "Qx7v#Kw2Zr9Tj",
    "?": "Qx7v?Kw2Zr9Tj",
    " ": "Qx7v Kw2Zr9Tj",
    "@@": "Qx7v@Kw2Z@r9Tj",
    "trailing @": "Qx7vKw2Zr9Tj@",
    "@ and /": "Qx7v@Kw2/Zr9Tj",
}


def fragments(secret: str, size: int = 4) -> set[str]:
    """Every piece of ``secret`` at least ``size`` characters long that contains no separator
    a message would show anyway (``@``, ``:``, ``/``...)."""
    pieces = set()
    for start in range(len(secret)):
        for end in range(start + size, len(secret) + 1):
            piece = secret[start:end]
            if piece.isalnum():
                pieces.add(piece)
    return pieces


def assert_no_fragment(text: str, *secrets: str) -> None:
    for secret in secrets:
        leaked = [piece for piece in fragments(secret) if piece in text]
        assert not leaked, (leaked, text)


def problems_for(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    return caught.value.problems


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(
            ("DATABASE_", "MONITOR_", "POSTGRES_", "DB_", "BACKUP_", "OPS_", "ADMIN_", "APP_", "PG")
        ):
            monkeypatch.delenv(name)
    return monkeypatch


def validate(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], **values: str) -> str:
    """``ops config validate`` (text and JSON) with ``values``: exit 2 both times; all output."""
    for name, value in values.items():
        env.setenv(name, value)
    assert main(["config", "validate"]) == 2
    captured = capsys.readouterr()
    assert main(["config", "validate", "--json"]) == 2
    shown = capsys.readouterr()
    assert json.loads(shown.out)["valid"] is False
    return captured.out + captured.err + shown.out + shown.err


# -- URLs whose password holds a character that must be percent-encoded ----------------------


@pytest.mark.parametrize("kind", sorted(PASSWORDS_WITH))
@pytest.mark.parametrize(
    ("variable", "hint"),
    [("DATABASE_URL", "POSTGRES_PASSWORD"), ("MONITOR_DATABASE_URL", "MONITOR_DB_PASSWORD")],
)
def test_unencoded_reserved_character_in_url_password_is_refused_without_showing_it(
    kind: str,
    variable: str,
    hint: str,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    password = PASSWORDS_WITH[kind]
    url = f"postgresql://dbops:{password}@db.internal:5432/app"
    problems = problems_for({variable: url})
    assert len(problems) == 1 and problems[0].startswith(f"{variable} "), problems
    assert "percent-encode" in problems[0] and hint in problems[0]
    assert_no_fragment(problems[0], password)
    assert_no_fragment(validate(clean_env, capsys, **{variable: url}), password)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://dbops:{PASSWORD}/db.internal/app",  # '@' forgotten
        f"postgresql://dbops:{PASSWORD}@db.internal:port/app",
        f"postgresql://dbops:{PASSWORD}",
        f"postgresql:/dbops:{PASSWORD}@db.internal/app",
        f"{PASSWORD}",  # a password pasted where the URL belongs
        f"postgresql://dbops:{PASSWORD}@[::1/app",
        "postgresql://dbops@db.internal/app?password=Qx7v#Kw2Zr9Tj",
        "postgresql://dbops@db.internal/app?password=Qx7v&Kw2Zr9Tj",
        "postgresql://dbops@db.internal/app?password=Qx7v&Kw2Zr9Tj=1",
        "postgresql://dbops@db.internal/app?password=Qx7v@Kw2Zr9Tj&port=0",
        f"postgresql://dbops@db.internal/app?password={PASSWORD}&port=99999",
    ],
)
def test_unparseable_url_problem_shows_no_part_of_the_password(url: str) -> None:
    problems = problems_for({"DATABASE_URL": url})
    assert len(problems) == 1 and problems[0].startswith("DATABASE_URL "), problems
    assert_no_fragment(problems[0], PASSWORD)


def test_percent_encoded_password_is_accepted_and_decoded() -> None:
    settings = load_db_settings({"DATABASE_URL": "postgresql://u:Qx7v%40Kw2%2FZr%3A9%23T%3F@h/db"})
    assert settings.url.password == "Qx7v@Kw2/Zr:9#T?"
    assert settings.redacted_url == "postgresql+psycopg2://u:***@h/db"


def test_url_without_password_takes_it_from_the_password_variable(tmp_path: Path) -> None:
    (tmp_path / "monitor").write_text("Qx7v@Kw2/Zr9Tj#mon\n")
    settings = load_settings(
        {
            "DATABASE_URL": "postgresql://dbops@db/app",
            "POSTGRES_PASSWORD": "Qx7v@Kw2/Zr9Tj#app",
            "MONITOR_DATABASE_URL": "postgresql://dbops_monitor@db/app",
            "MONITOR_DB_PASSWORD_FILE": str(tmp_path / "monitor"),
        }
    )
    assert settings.db.url.password == "Qx7v@Kw2/Zr9Tj#app"
    assert settings.sidecar.monitor_url is not None
    assert settings.sidecar.monitor_url.password == "Qx7v@Kw2/Zr9Tj#mon"
    assert settings.seed.monitor_db_password == "Qx7v@Kw2/Zr9Tj#mon"


def test_password_in_the_url_wins_over_the_password_variable() -> None:
    settings = load_db_settings(
        {"DATABASE_URL": "postgresql://u:inurl@db/app", "POSTGRES_PASSWORD": "invariable"}
    )
    assert settings.url.password == "inurl"


def test_unencoded_at_in_the_query_or_a_socket_host_is_not_mistaken_for_a_password() -> None:
    for url in (
        "postgresql://u:pw@db/app?application_name=a@b",
        "postgresql:///app?host=/run/postgresql&user=dbops",
        "postgresql://dbops@/app?host=/run/postgresql&port=5433",
    ):
        load_db_settings({"DATABASE_URL": url})


# -- password forms in the query and in keywords: redacted wherever shown ----------------------


def test_config_show_redacts_query_password_of_both_urls(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("DATABASE_URL", f"postgresql://dbops@db/app?password={PASSWORD}")
    clean_env.setenv(
        "MONITOR_DATABASE_URL", "postgresql://mon@db/app?sslmode=disable&password=Mz4pLq8Wn3Ys"
    )
    for flag in ([], ["--json"]):
        assert main(["config", "show", *flag]) == 0
        out = capsys.readouterr()
        assert_no_fragment(out.out + out.err, PASSWORD, "Mz4pLq8Wn3Ys")
        assert "password=***" in out.out and "db/app" in out.out


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"postgresql://u:{PASSWORD}@h/db", PASSWORD),
        ("postgresql://u:Qx7v@Kw2Z@r9Tj@h/db", "Qx7v@Kw2Z@r9Tj"),
        (f"postgresql://u@h/db?sslmode=require&password={PASSWORD}&x=1", PASSWORD),
        (f"host=h dbname=db password={PASSWORD} user=u", PASSWORD),
        ("host=h password='Qx7v Kw2Z\\' r9Tj' user=u", "Qx7v Kw2Z\\' r9Tj"),
        (f"host=h password = {PASSWORD}", PASSWORD),
        (f"PGPASSWORD={PASSWORD} pg_dump", PASSWORD),
        (f'{{"password": "{PASSWORD}", "user": "u"}}', PASSWORD),
        (f"sslpassword={PASSWORD}", PASSWORD),
        (f'{{\\"password\\": \\"{PASSWORD}\\"}}', PASSWORD),  # JSON inside a JSON string
        (f"dsn=host%3Dh%20password%3D{PASSWORD}", PASSWORD),  # a percent-encoded conninfo
        (f"password='{PASSWORD}", PASSWORD),  # quote never closed
        (f'could not connect to "postgresql://u:{PASSWORD}@h/db"', PASSWORD),
    ],
)
def test_redact_hides_every_password_form(text: str, secret: str) -> None:
    shown = redact(text)
    assert "***" in shown
    assert_no_fragment(shown, secret)


def test_redact_keeps_what_is_not_a_password() -> None:
    assert redact("postgresql://dbops@db:5432/app") == "postgresql://dbops@db:5432/app"
    assert redact("postgresql://dbops:pw@db/app") == "postgresql://dbops:***@db/app"
    assert redact('FATAL:  password authentication failed for user "dbops"') == (
        'FATAL:  password authentication failed for user "dbops"'
    )
    assert redact_unparsed_url("postgresql://u:a@b@db/app") == "postgresql://***@db"


def test_query_password_with_an_at_sign_is_valid_and_redacted_whole() -> None:
    settings = load_db_settings({"DATABASE_URL": "postgresql://u@db/app?password=Qx7v@Kw2Zr9Tj"})
    assert settings.url.query["password"] == "Qx7v@Kw2Zr9Tj"
    assert settings.redacted_url == "postgresql+psycopg2://u@db/app?password=***"


def test_log_lines_are_redacted_in_text_and_json() -> None:
    record = logging.LogRecord(
        "ops",
        logging.INFO,
        __file__,
        1,
        "connects to %s",
        (f"postgresql://u@h/d?password={PASSWORD}",),
        None,
    )
    for formatter in (TextFormatter("%(message)s"), JsonFormatter()):
        shown = formatter.format(record)
        assert "password=***" in shown
        assert_no_fragment(shown, PASSWORD)


def test_a_library_s_record_of_an_interrupt_is_not_shown_but_its_errors_are(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging("text", "info")
    try:
        pool_log = logging.getLogger("sqlalchemy.pool.impl.QueuePool")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            pool_log.error("Exception closing connection %r", "<connection>", exc_info=True)
        try:
            raise OSError("server closed the connection unexpectedly")
        except OSError:
            pool_log.error("Exception closing connection %r", "<connection>", exc_info=True)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    shown = capsys.readouterr().err
    assert "KeyboardInterrupt" not in shown
    assert shown.count("Exception closing connection") == 1
    assert "OSError: server closed the connection unexpectedly" in shown


# -- values that validate but fail at runtime ---------------------------------------------------

RUNTIME_FAILURES = {
    "DB_STATEMENT_TIMEOUT": ("99999999d", "PostgreSQL's limit"),
    "OPS_QUERY_TIMEOUT": ("25d", "PostgreSQL's limit"),
    "OPS_LOCK_TIMEOUT": ("3000000s", "PostgreSQL's limit"),
    "OPS_COLLECTOR_TTL": ("99999999d", "longest timer"),
    "BACKUP_MAX_AGE": ("99999999999w", "longest timer"),
    "DB_WAIT_TIMEOUT": ("9" * 400, "longest timer"),
    "DB_POOL_TIMEOUT": ("nan", "finite"),
    "DB_POOL_RECYCLE": ("99999999999", "<= 2147483647"),
    "DB_CONNECT_TIMEOUT": ("2147483648", "<= 2147483647"),
    "DB_POOL_SIZE": ("1000000", "<= 262143"),
    "DB_MAX_OVERFLOW": ("1" + "0" * 30, "<= 262143"),
    "POSTGRES_PORT": ("65536", "<= 65535"),
    "BACKUP_KEEP_LAST": ("1" + "0" * 40, "<= 2147483647"),
    "BACKUP_COMPRESSION": ("gzip:99", "gzip level must be 1-9"),
}


def test_every_value_that_would_fail_at_runtime_is_listed_at_once(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environ = {name: value for name, (value, _) in RUNTIME_FAILURES.items()}
    problems = problems_for(environ)
    for name, (value, reason) in RUNTIME_FAILURES.items():
        shown = value if len(value) < 100 else None
        matching = [p for p in problems if p.startswith(f"{name} ")]
        assert len(matching) == 1, (name, problems)
        assert reason in matching[0], matching
        if shown is not None:
            assert matching[0].startswith(f"{name} {shown}: "), matching
    output = validate(clean_env, capsys, **environ)
    assert all(name in output for name in RUNTIME_FAILURES)


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("DB_STATEMENT_TIMEOUT", "0.5ms", "rounds to 0"),
        ("DB_STATEMENT_TIMEOUT", "0.0004", "rounds to 0"),
        ("DB_STATEMENT_TIMEOUT", "24856d", "at most"),
        ("DB_POOL_TIMEOUT", "inf", "finite"),
        ("DB_POOL_TIMEOUT", "-inf", "finite"),
        ("DB_POOL_TIMEOUT", "1e400", "finite"),
        ("DB_POOL_TIMEOUT", "1e300", "<="),
        ("OPS_LOCK_TIMEOUT", "0.0001", "at least"),
        ("BACKUP_COMPRESSION", "lz4:13", "lz4 level must be 1-12"),
        ("BACKUP_COMPRESSION", "zstd:0", "zstd level must be 1-22"),
        ("BACKUP_COMPRESSION", "none:5", "no level"),
        ("DB_APPLICATION_NAME", "é" * 40, "ASCII"),
        ("OPS_APPLICATION_NAME", "side\tcar", "printable"),
        ("OPS_LISTEN", "999.1.1.1:9188", "IP address or a host name"),
        ("OPS_LISTEN", "[::g]:9188", "HOST:PORT"),
        ("OPS_LISTEN", "[127.0.0.1]:9188", "IP address or a host name"),
        ("OPS_LISTEN", "bad_host!:9188", "IP address or a host name"),
    ],
)
def test_value_that_fails_at_runtime_is_refused(name: str, value: str, reason: str) -> None:
    problems = problems_for({name: value})
    assert len(problems) == 1 and problems[0].startswith(f"{name} ")
    assert reason in problems[0], problems


def test_zero_statement_timeout_still_means_none() -> None:
    assert load_db_settings({"DB_STATEMENT_TIMEOUT": "0"}).statement_timeout == 0
    assert load_db_settings({"DB_STATEMENT_TIMEOUT": "1ms"}).statement_timeout == 0.001


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("port=70000", "port must be 1-65535"),
        ("host=/run/postgresql&port=0", "port must be 1-65535"),
        ("connect_timeout=2147483648", "connect_timeout"),
        ("keepalives=2", "keepalives"),
        ("no_such_option=1", "not a libpq connection parameter"),
        ("dbname=other", "dbname is not allowed"),
        ("service=prod", "service is not allowed"),
    ],
)
def test_url_query_parameters_libpq_would_refuse_are_refused(query: str, reason: str) -> None:
    problems = problems_for({"DATABASE_URL": f"postgresql://u:{PASSWORD}@h/app?{query}"})
    assert len(problems) == 1 and reason in problems[0], problems
    assert_no_fragment(problems[0], PASSWORD)


def test_database_and_user_names_postgresql_would_cut_are_refused() -> None:
    long_name = "é" * 32  # 32 characters, 64 bytes
    problems = problems_for(
        {
            "DATABASE_URL": f"postgresql://u:{PASSWORD}@h/{long_name}",
            "MONITOR_DATABASE_URL": f"postgresql://{'m' * 64}:{PASSWORD}@h/app",
        }
    )
    assert len(problems) == 2, problems
    assert "database name is longer than 63 bytes" in problems[0]
    assert "user name is longer than 63 bytes" in problems[1]
    assert_no_fragment("\n".join(problems), PASSWORD)
    problems = problems_for({"POSTGRES_DB": long_name, "POSTGRES_USER": "a" * 64})
    assert [p.split(" ")[0] for p in problems] == ["POSTGRES_USER", "POSTGRES_DB"]


def test_url_port_beyond_65535_is_refused() -> None:
    problems = problems_for({"DATABASE_URL": f"postgresql://u:{PASSWORD}@h:65536/app"})
    assert problems == ["DATABASE_URL postgresql://u:***@h:65536/app: port must be 1-65535"]


# -- *_FILE that is not a small UTF-8 file --------------------------------------------------------


def test_secret_files_that_cannot_be_secrets_are_listed_at_once(tmp_path: Path) -> None:
    (tmp_path / "latin1").write_bytes(b"caf\xe9-password-long\n")
    (tmp_path / "huge").write_bytes(b"x" * (64 * 1024 + 1))
    (tmp_path / "dir").mkdir()
    (tmp_path / "nul").write_bytes(b"Qx7vKw2Z\x00r9Tj")
    os.mkfifo(tmp_path / "fifo")
    environ = {
        "POSTGRES_PASSWORD_FILE": str(tmp_path / "latin1"),
        "ADMIN_PASSWORD_FILE": str(tmp_path / "huge"),
        "APP_DB_PASSWORD_FILE": "/dev/zero",
        "MONITOR_DB_PASSWORD_FILE": str(tmp_path / "fifo"),
        "BACKUP_DB_PASSWORD_FILE": str(tmp_path / "dir"),
        "DATABASE_URL_FILE": str(tmp_path / "nul"),
    }
    problems: list[str] = []
    worker = threading.Thread(target=lambda: problems.extend(problems_for(environ)), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "reading a secret file hung"
    expected = {
        "POSTGRES_PASSWORD_FILE": "not UTF-8 text",
        "ADMIN_PASSWORD_FILE": "larger than 64 KiB",
        "APP_DB_PASSWORD_FILE": "not a regular file",
        "MONITOR_DB_PASSWORD_FILE": "not a regular file",
        "BACKUP_DB_PASSWORD_FILE": "a directory",
        "DATABASE_URL_FILE": "NUL",
    }
    for name, reason in expected.items():
        matching = [p for p in problems if p.startswith(f"{name} ")]
        assert len(matching) == 1 and reason in matching[0], (name, problems)
    assert_no_fragment("\n".join(problems), "Qx7vKw2Z", "password-long")


def test_endless_secret_file_is_a_listed_error_from_the_command_line(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "DATABASE_"))}
    env.update(POSTGRES_PASSWORD_FILE="/dev/zero", DATABASE_URL_FILE=str(tmp_path / "fifo"))
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "config", "validate"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "DATABASE_URL_FILE" in result.stderr and "not a regular file" in result.stderr


# -- the URL's query reaches pg_dump and pg_restore ------------------------------------------------


def test_libpq_env_takes_host_port_and_password_from_the_query() -> None:
    settings = load_db_settings(
        {"DATABASE_URL": f"postgresql://dbops@/app?host=/run/pg&port=5433&password={PASSWORD}"}
    )
    env = libpq_env(settings.url)
    assert (env["PGHOST"], env["PGPORT"], env["PGPASSWORD"]) == ("/run/pg", "5433", PASSWORD)
    assert (env["PGUSER"], env["PGDATABASE"]) == ("dbops", "app")


def test_libpq_env_query_port_wins_like_it_does_for_the_pool() -> None:
    settings = load_db_settings({"DATABASE_URL": "postgresql://u:pw@h:5432/app?port=6543"})
    assert libpq_env(settings.url)["PGPORT"] == "6543"


def test_libpq_env_turns_sqlalchemy_multi_host_into_libpq_lists() -> None:
    settings = load_db_settings(
        {
            "DATABASE_URL": "postgresql://u:pw@/app?host=h1:5432&host=h2:5433"
            "&target_session_attrs=read-write"
        }
    )
    env = libpq_env(settings.url)
    assert (env["PGHOST"], env["PGPORT"]) == ("h1,h2", "5432,5433")
    assert env["PGTARGETSESSIONATTRS"] == "read-write"


@pytest.mark.parametrize("piece", ["a.a.", "x://", "password='", "p://u:@", "://@"])
def test_redact_stays_linear_on_hostile_text(piece: str) -> None:
    """A log line can carry text from outside (an alert's summary): no backtracking blow-up."""
    text = piece * (1_000_000 // len(piece))
    started = time.perf_counter()
    redact(text)
    assert time.perf_counter() - started < 5


def test_config_show_redacts_a_password_pasted_into_an_ordinary_variable(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("DB_APPLICATION_NAME", f"password={PASSWORD}")
    clean_env.setenv("OPS_APPLICATION_NAME", f"sidecar host=db password='{PASSWORD}'")
    for flag in ([], ["--json"]):
        assert main(["config", "show", *flag]) == 0
        out = capsys.readouterr().out
        assert "password=***" in out
        assert_no_fragment(out, PASSWORD)


def test_password_pasted_into_an_ordinary_variable_is_redacted_in_its_problem() -> None:
    problems = problems_for(
        {
            "BACKUP_SCHEDULE": f"password={PASSWORD}",
            "BACKUP_COMPRESSION": f"postgresql://u:{PASSWORD}@db/app",
        }
    )
    assert len(problems) == 2 and all("***" in p for p in problems), problems
    assert_no_fragment("\n".join(problems), PASSWORD)


def test_whitespace_around_a_url_is_no_part_of_it(tmp_path: Path) -> None:
    (tmp_path / "url").write_text("postgresql://u:pw@db/app\r\n")
    assert load_db_settings({"DATABASE_URL": " postgresql://u:pw@db/app "}).url.host == "db"
    assert load_db_settings({"DATABASE_URL_FILE": str(tmp_path / "url")}).url.database == "app"
