"""A disabled collector is neither queried nor exported: nothing is counted twice next to
CloudNativePG's own exporter, and the collectors left on still report."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.engine import URL

from ops.collectors.exporter import ExporterService
from ops.settings import load_settings

CNPG_COVERED = "activity,databases,replication"


@pytest.fixture
def service(migrated_db: URL) -> Iterator[tuple[ExporterService, CollectorRegistry]]:
    settings = load_settings(
        {
            "DATABASE_URL": migrated_db.render_as_string(hide_password=False),
            "OPS_COLLECTORS_DISABLED": CNPG_COVERED,
        }
    )
    registry = CollectorRegistry()
    exporter = ExporterService(settings, registry)
    yield exporter, registry
    exporter.stop()


def test_disabled_collectors_export_nothing_and_the_rest_still_report(
    service: tuple[ExporterService, CollectorRegistry],
) -> None:
    exporter, registry = service
    exporter.exporter.refresh()
    body = generate_latest(registry).decode()
    assert registry.get_sample_value("dbops_pg_up") == 1
    for gone in (
        "dbops_pg_connections",
        "dbops_pg_max_connections",
        "dbops_pg_longest_transaction_seconds",
        "dbops_pg_xact_commit_total",
        "dbops_pg_deadlocks_total",
        "dbops_pg_in_recovery",
    ):
        assert f"\n{gone}" not in body, gone
    for name in CNPG_COVERED.split(","):
        assert f'collector="{name}"' not in body, name
    for name in ("sizes", "indexes", "statements"):
        assert registry.get_sample_value("dbops_collector_errors_total", {"collector": name}) == 0
        assert registry.get_sample_value(
            "dbops_collector_last_success_timestamp_seconds", {"collector": name}
        )
    assert "\ndbops_pg_database_size_bytes{" in body
