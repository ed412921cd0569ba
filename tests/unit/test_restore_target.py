"""Restore target names, decided before anything connects."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from psycopg2.extensions import parse_dsn

from ops.backup.target import (
    MAX_NAME_BYTES,
    TargetError,
    check_target,
    conninfo,
    kept_name,
    name_problem,
    shown,
    staging_name,
)
from ops.backup.verify import scratch_database

LIVE = {"dbops": "the live database"}
WHEN = datetime(2026, 11, 28, 19, 30, 5, tzinfo=UTC)


def refusal(name: str, **options: bool) -> str:
    with pytest.raises(TargetError) as refused:
        check_target(name, live=LIVE, **options)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("--target-db ")
    return message


@pytest.mark.parametrize(
    "name",
    [
        "dbname=victimdb",
        "host=evil.example dbname=x",
        " dbname = victim",
        "postgresql://evil.example/victim",
        "POSTGRES://evil/victim",
        "service=prod",
    ],
)
def test_a_connection_string_is_refused_as_a_target_name(name: str) -> None:
    assert "not a connection string" in refusal(name)


@pytest.mark.parametrize("name", ["template0", "template1"])
def test_template_databases_are_refused_whatever_the_options(name: str) -> None:
    options = {"force": True, "replace_live": False, "allow_postgres": True}
    assert "template database" in refusal(name, **options)


def test_postgres_needs_its_own_option() -> None:
    assert "--allow-postgres-db" in refusal("postgres", force=True)
    check_target("postgres", live=LIVE, allow_postgres=True)


def test_live_database_needs_force_and_replace_live() -> None:
    assert "--force --replace-live" in refusal("dbops")
    assert "--force --replace-live" in refusal("dbops", force=True)
    assert "--force --replace-live" in refusal("dbops", replace_live=True)
    check_target("dbops", live=LIVE, force=True, replace_live=True)


def test_replace_live_is_refused_for_a_database_that_is_not_live() -> None:
    assert "only for the live database (dbops)" in refusal("other", force=True, replace_live=True)


def test_names_of_dbops_own_scratch_databases_are_refused() -> None:
    assert "dbops_verify_" in refusal("dbops_verify_20260101t000000z_abcdef")
    assert "dbops_restoring_" in refusal(staging_name(WHEN, "abc123"))


def test_a_name_of_63_bytes_is_accepted_and_64_bytes_refused_counting_utf8() -> None:
    check_target("a" * 63, live=LIVE)
    check_target("é" * 31 + "a", live=LIVE)  # 63 bytes, 32 characters
    assert "is 64" in refusal("a" * 64)
    assert "is 64" in refusal("é" * 32)  # 32 characters, 64 bytes
    assert "is 66" in refusal("数据库" * 7 + "x" * 3)
    assert "is 40000" in refusal("x" * 40000)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "cannot be empty"),
        ("a\x00b", "cannot contain NUL"),
        ("line\nforged", "control characters (\\n)"),
        ("bell\x07", "control characters (\\x07)"),
        ("bad\udcffbyte", "valid UTF-8"),
    ],
)
def test_empty_nul_control_and_undecodable_names_are_refused(name: str, reason: str) -> None:
    message = refusal(name)
    assert reason in message
    assert "\x00" not in message and "\x07" not in message


def test_an_ordinary_odd_name_is_accepted() -> None:
    for name in ("restored", "Mixed Case", 'it\'s \\ "quoted"', "ünïcødé", "dbops_restored"):
        assert name_problem(name) is None
        check_target(name, live=LIVE)


@pytest.mark.parametrize(
    "name", ["plain", "dbname=victim host=evil", "it's", "back\\slash", "a b", "' host=evil '"]
)
def test_conninfo_gives_libpq_the_name_literally(name: str) -> None:
    parsed = parse_dsn(conninfo(name))  # libpq's own parser (PQconninfoParse)
    assert parsed == {"dbname": name}


def test_kept_and_staging_names_fit_in_63_bytes_on_character_boundaries() -> None:
    assert kept_name("dbops", WHEN) == "dbops_replaced_20261128T193005Z"
    long = kept_name("é" * 31 + "a", WHEN)
    assert long.endswith("_replaced_20261128T193005Z")
    assert len(long.encode()) <= MAX_NAME_BYTES
    long.encode().decode("utf-8")  # not cut inside a character
    assert len(staging_name(WHEN, "abc123").encode()) <= MAX_NAME_BYTES


def test_scratch_database_of_a_long_backup_id_stays_distinct_and_within_63_bytes() -> None:
    first, second = scratch_database("x" * 100 + "1"), scratch_database("x" * 100 + "2")
    assert first != second
    assert len(first) <= MAX_NAME_BYTES and len(second) <= MAX_NAME_BYTES
    assert scratch_database("20261128T193005Z-abcdef") == "dbops_verify_20261128t193005z_abcdef"


def test_shown_escapes_control_characters_and_caps_the_length() -> None:
    assert shown("a\nb") == "'a\\nb'"
    assert shown("x" * 500).endswith("… (500 characters)'")
    assert len(shown("x" * 500)) < 100


def test_refusals_name_make_variables_when_run_through_make(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ops.backup.target import TargetError, check_target

    monkeypatch.setenv("OPS_HINTS", "make")
    with pytest.raises(TargetError) as caught:
        check_target("dbops", live={"dbops": "the live database"})
    message = str(caught.value)
    assert message.startswith("TARGET_DB 'dbops': ")
    assert "FORCE=1 REPLACE_LIVE=1" in message and "--" not in message
    monkeypatch.delenv("OPS_HINTS")
    with pytest.raises(TargetError, match="needs --force --replace-live"):
        check_target("dbops", live={"dbops": "the live database"})
