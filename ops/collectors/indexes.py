"""Index usage from ``pg_stat_user_indexes`` (cached: one row per index).

Statistics views take no relation locks. Unique and primary-key indexes enforce constraints,
so they are never counted as unused, however rarely they are scanned.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.engine import Connection

from ops.collectors.base import OTHER, Options, rows

INDEX_SCANS = """
WITH ranked AS (
    SELECT s.schemaname AS schema, s.relname AS table_name, s.indexrelname AS name,
           s.idx_scan AS scans,
           row_number() OVER (ORDER BY s.idx_scan DESC, s.schemaname, s.relname, s.indexrelname)
               AS rank
    FROM pg_stat_user_indexes s
)
SELECT schema, table_name, name, scans FROM ranked WHERE rank <= :top_n
UNION ALL
SELECT NULL, NULL, NULL, sum(scans) FROM ranked WHERE rank > :top_n HAVING count(*) > 0
"""

UNUSED = """
SELECT count(*) AS unused
FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid
WHERE s.idx_scan = 0 AND NOT i.indisunique AND NOT i.indisprimary AND NOT i.indisexclusion
"""


class IndexUsageCollector:
    name = "indexes"
    cached = True

    def collect(self, connection: Connection, options: Options) -> list[Metric]:
        datname = connection.exec_driver_sql("SELECT current_database()").scalar_one()
        scans = CounterMetricFamily(
            "dbops_pg_index_scans",
            f"Index scans: the {options.top_n} most used indexes, then one {OTHER} sum.",
            labels=["datname", "schema", "table", "index"],
        )
        for row in rows(connection, INDEX_SCANS, top_n=options.top_n):
            labels = [row.schema or OTHER, row.table_name or OTHER, row.name or OTHER]
            scans.add_metric([datname, *labels], float(row.scans or 0))
        unused = GaugeMetricFamily(
            "dbops_pg_unused_indexes",
            "Non-unique indexes never scanned since statistics were reset.",
            labels=["datname"],
        )
        unused.add_metric([datname], int(rows(connection, UNUSED)[0].unused))
        return [scans, unused]
