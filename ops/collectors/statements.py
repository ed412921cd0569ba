"""The costliest statements from ``pg_stat_statements`` (cached: up to thousands of entries).

Read with ``pg_stat_statements(false)``, which skips the query texts (the expensive part, and
texts may carry literals nobody wants in a metrics store). The extension is optional: without
it (or without the library preloaded) the collector says so in
``dbops_pg_stat_statements_enabled 0`` and exports nothing else, which is not an error.
"""

from __future__ import annotations

import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import exc
from sqlalchemy.engine import Connection

from ops.collectors.base import OTHER, Options, rows

log = logging.getLogger(__name__)

EXTENSION = """
SELECT n.nspname AS schema, e.extversion AS version
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname = 'pg_stat_statements'
"""

TOP_STATEMENTS = """
WITH grouped AS (
    SELECT queryid, dbid, userid, sum(calls) AS calls, sum({time_column}) / 1000.0 AS seconds
    FROM {function}(false)
    WHERE queryid IS NOT NULL
    GROUP BY queryid, dbid, userid
),
ranked AS (
    SELECT *, row_number() OVER (ORDER BY seconds DESC, queryid, dbid, userid) AS rank
    FROM grouped
)
SELECT r.queryid::text AS queryid, d.datname, u.rolname, r.calls, r.seconds
FROM ranked r
LEFT JOIN pg_database d ON d.oid = r.dbid
LEFT JOIN pg_roles u ON u.oid = r.userid
WHERE r.rank <= :top_n
UNION ALL
SELECT NULL, NULL, NULL, sum(calls), sum(seconds) FROM ranked WHERE rank > :top_n
HAVING count(*) > 0
"""


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


class StatementsCollector:
    name = "statements"
    cached = True

    def collect(self, connection: Connection, options: Options) -> list[Metric]:
        enabled = GaugeMetricFamily(
            "dbops_pg_stat_statements_enabled",
            "1 when pg_stat_statements is installed and loaded in the monitored database.",
        )
        extension = rows(connection, EXTENSION)
        if not extension:
            enabled.add_metric([], 0)
            return [enabled]
        schema, version = extension[0].schema, extension[0].version
        quoted = connection.dialect.identifier_preparer.quote_identifier(schema)
        time_column = "total_exec_time" if _version_tuple(version) >= (1, 8) else "total_time"
        sql = TOP_STATEMENTS.format(
            time_column=time_column, function=f"{quoted}.pg_stat_statements"
        )
        try:
            found = rows(connection, sql, top_n=options.top_n)
        except exc.DBAPIError as error:
            if error.connection_invalidated or "shared_preload_libraries" not in str(error.orig):
                raise
            log.debug("pg_stat_statements is installed but not loaded")
            enabled.add_metric([], 0)
            return [enabled]
        enabled.add_metric([], 1)
        labels = ["queryid", "datname", "user"]
        calls = CounterMetricFamily(
            "dbops_pg_statement_calls",
            f"Calls of the {options.top_n} statements with most total time, then one {OTHER} sum.",
            labels=labels,
        )
        seconds = CounterMetricFamily(
            "dbops_pg_statement_seconds",
            f"Execution time of the {options.top_n} costliest statements, then one {OTHER} sum.",
            labels=labels,
        )
        for row in found:
            values = [row.queryid or OTHER, row.datname or OTHER, row.rolname or OTHER]
            calls.add_metric(values, float(row.calls or 0))
            seconds.add_metric(values, float(row.seconds or 0))
        return [enabled, calls, seconds]
