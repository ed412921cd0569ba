"""Workload settings: mode presets sized from the pool, explicit values over them, all problems."""

from __future__ import annotations

import pytest

from db.settings import ConfigError
from ops.workload import load_workload_settings


def test_saturate_mode_puts_two_agents_on_every_pooled_connection() -> None:
    _, settings = load_workload_settings(
        {"WORKLOAD_MODE": "saturate", "DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "1"}
    )
    assert settings.mode == "saturate"
    assert settings.concurrency == 12
    assert settings.hold_seconds >= 1.0
    assert settings.think_seconds < settings.hold_seconds


def test_steady_mode_stays_within_the_pool() -> None:
    _, settings = load_workload_settings({"DB_POOL_SIZE": "2", "DB_MAX_OVERFLOW": "0"})
    assert settings.mode == "steady"
    assert settings.concurrency == 2
    assert settings.think_seconds > 0


def test_explicit_values_override_the_mode_preset() -> None:
    _, settings = load_workload_settings(
        {
            "WORKLOAD_MODE": "saturate",
            "WORKLOAD_CONCURRENCY": "7",
            "WORKLOAD_HOLD_SECONDS": "500ms",
            "WORKLOAD_DURATION": "2m",
            "WORKLOAD_LISTEN": "127.0.0.1:9999",
        }
    )
    assert (settings.concurrency, settings.hold_seconds, settings.duration) == (7, 0.5, 120.0)
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 9999)


def test_every_bad_workload_variable_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_workload_settings(
            {
                "WORKLOAD_MODE": "flood",
                "WORKLOAD_CONCURRENCY": "0",
                "WORKLOAD_HOLD_SECONDS": "soon",
                "WORKLOAD_LISTEN": "nowhere",
                "DB_POOL_SIZE": "-1",
            }
        )
    reported = {problem.split(" ")[0] for problem in caught.value.problems}
    assert reported == {
        "WORKLOAD_MODE",
        "WORKLOAD_CONCURRENCY",
        "WORKLOAD_HOLD_SECONDS",
        "WORKLOAD_LISTEN",
        "DB_POOL_SIZE",
    }
