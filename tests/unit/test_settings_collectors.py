"""OPS_COLLECTORS_DISABLED: which exporter collectors to leave out, names checked up front."""

from __future__ import annotations

import pytest

from db.settings import ConfigError
from ops.collectors.base import COLLECTOR_NAMES
from ops.collectors.exporter import default_collectors
from ops.settings import load_settings

URL = {"DATABASE_URL": "postgresql://dbops@localhost/dbops"}


def test_collector_names_are_exactly_the_exporters_collectors() -> None:
    assert tuple(c.name for c in default_collectors()) == COLLECTOR_NAMES


def test_no_collector_is_disabled_by_default() -> None:
    assert load_settings(URL).sidecar.disabled_collectors == ()


def test_disabled_collectors_are_parsed_trimmed_and_in_canonical_order() -> None:
    settings = load_settings(
        {**URL, "OPS_COLLECTORS_DISABLED": " Replication, activity,,databases "}
    )
    assert settings.sidecar.disabled_collectors == ("activity", "databases", "replication")
    kept = [c.name for c in default_collectors(settings.sidecar.disabled_collectors)]
    assert kept == ["sizes", "indexes", "statements"]


def test_an_unknown_collector_name_is_one_variable_value_reason_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**URL, "OPS_COLLECTORS_DISABLED": "activity,conections", "OPS_TOP_N": "0"})
    problems = caught.value.problems
    mine = [p for p in problems if p.startswith("OPS_COLLECTORS_DISABLED ")]
    assert mine == [
        "OPS_COLLECTORS_DISABLED activity,conections: unknown collector 'conections'; known: "
        + ", ".join(COLLECTOR_NAMES)
    ]
    # reported together with the other problems, not instead of them
    assert any(p.startswith("OPS_TOP_N ") for p in problems)
