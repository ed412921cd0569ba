"""Per-database counters from ``pg_stat_database`` (scrape time: one row per database)."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, Metric
from sqlalchemy.engine import Connection

from ops.collectors.base import Options, rows

DATABASE_STATS = """
SELECT datname, xact_commit, xact_rollback, blks_hit, blks_read, deadlocks
FROM pg_stat_database
WHERE datname IS NOT NULL
ORDER BY datname
"""

COUNTERS = (
    ("xact_commit", "dbops_pg_xact_commit", "Transactions committed."),
    ("xact_rollback", "dbops_pg_xact_rollback", "Transactions rolled back."),
    ("blks_hit", "dbops_pg_blks_hit", "Block reads served from shared buffers."),
    ("blks_read", "dbops_pg_blks_read", "Blocks read from disk or the OS cache."),
    ("deadlocks", "dbops_pg_deadlocks", "Deadlocks detected."),
)


class DatabaseStatsCollector:
    name = "databases"
    cached = False

    def collect(self, connection: Connection, options: Options) -> list[Metric]:
        families = {
            column: CounterMetricFamily(name, doc, labels=["datname"])
            for column, name, doc in COUNTERS
        }
        for row in rows(connection, DATABASE_STATS):
            for column, family in families.items():
                family.add_metric([row.datname], float(getattr(row, column) or 0))
        return list(families.values())
