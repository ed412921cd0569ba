"""DB_ENABLED=false, the rollback switch: the service runs on without its database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from db import engine as db_engine
from db.errors import DatabaseDisabled
from db.settings import ConfigError


@pytest.fixture
def switched(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    db_engine.dispose()
    yield monkeypatch
    monkeypatch.undo()
    db_engine.dispose()


def test_disabled_database_raises_one_catchable_error_from_engine_and_session(
    switched: pytest.MonkeyPatch,
) -> None:
    # no connection settings at all: a switched-off service needs none
    switched.setenv("DB_ENABLED", "false")
    switched.setenv("DATABASE_URL", "notaurl")

    with pytest.raises(DatabaseDisabled, match=r"switched off \(DB_ENABLED=false\)"):
        db_engine.get_engine()
    with pytest.raises(DatabaseDisabled), db_engine.session_scope():
        pass  # pragma: no cover - the scope never opens


def test_disabled_database_health_check_says_disabled_without_connecting(
    switched: pytest.MonkeyPatch,
) -> None:
    switched.setenv("DB_ENABLED", "false")

    health = db_engine.health_check()

    assert health.status == "disabled" and health.ok is False
    assert health.as_dict()["error"] == "the database is switched off (DB_ENABLED=false)"


def test_db_enabled_is_validated_like_every_setting(switched: pytest.MonkeyPatch) -> None:
    switched.setenv("DB_ENABLED", "maybe")
    with pytest.raises(ConfigError) as caught:
        db_engine.get_engine()
    assert caught.value.problems == ["DB_ENABLED maybe: must be true or false"]


def test_switching_back_on_takes_effect_after_dispose(switched: pytest.MonkeyPatch) -> None:
    switched.setenv("DB_ENABLED", "false")
    assert db_engine.enabled() is False
    switched.setenv("DB_ENABLED", "true")
    assert db_engine.enabled() is False  # read once per process
    db_engine.dispose()
    assert db_engine.enabled() is True
