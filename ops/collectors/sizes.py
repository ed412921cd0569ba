"""Database, table and index sizes (cached: cost grows with the number of relations).

``pg_table_size`` and ``pg_relation_size`` open the relation with ACCESS SHARE, which queues
behind an ACCESS EXCLUSIVE lock (``ALTER TABLE``, ``VACUUM FULL``, ``LOCK TABLE``) and, worse,
makes every later query on that table queue behind the size query. So a relation that holds or
awaits an ACCESS EXCLUSIVE lock is measured from ``pg_class.relpages`` (no lock; as fresh as
the last VACUUM or ANALYZE), and the connection's ``lock_timeout`` catches the race of a lock
taken between the two. ``pg_database_size`` takes no relation lock at all.
"""

from __future__ import annotations

import logging

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import exc
from sqlalchemy.engine import Connection

from ops.collectors.base import OTHER, Options, rows

log = logging.getLogger(__name__)

DATABASES = "SELECT oid, datname FROM pg_database ORDER BY datname"
DATABASE_SIZE = "SELECT pg_database_size(CAST(:oid AS oid)) AS bytes"

_LOCKED = """
locked AS (
    SELECT relation FROM pg_locks
    WHERE locktype = 'relation' AND mode = 'AccessExclusiveLock'
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
)"""

_USER_RELATION = "n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'"

TABLE_SIZES = f"""
WITH {_LOCKED},
sized AS (
    SELECT n.nspname AS schema, c.relname AS name,
           coalesce(CASE WHEN c.oid IN (SELECT relation FROM locked)
                         THEN c.relpages::bigint * current_setting('block_size')::bigint
                         ELSE pg_table_size(c.oid) END, 0) AS bytes
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'm') AND {_USER_RELATION}
),
ranked AS (SELECT *, row_number() OVER (ORDER BY bytes DESC, schema, name) AS rank FROM sized)
SELECT schema, name, bytes FROM ranked WHERE rank <= :top_n
UNION ALL
SELECT NULL, NULL, sum(bytes) FROM ranked WHERE rank > :top_n HAVING count(*) > 0
"""

INDEX_SIZES = f"""
WITH {_LOCKED},
sized AS (
    SELECT n.nspname AS schema, t.relname AS table_name, c.relname AS name,
           coalesce(CASE WHEN i.indexrelid IN (SELECT relation FROM locked)
                          OR i.indrelid IN (SELECT relation FROM locked)
                         THEN c.relpages::bigint * current_setting('block_size')::bigint
                         ELSE pg_relation_size(i.indexrelid) END, 0) AS bytes
    FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_class t ON t.oid = i.indrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'i' AND {_USER_RELATION}
),
ranked AS (
    SELECT *, row_number() OVER (ORDER BY bytes DESC, schema, table_name, name) AS rank
    FROM sized
)
SELECT schema, table_name, name, bytes FROM ranked WHERE rank <= :top_n
UNION ALL
SELECT NULL, NULL, NULL, sum(bytes) FROM ranked WHERE rank > :top_n HAVING count(*) > 0
"""


class SizesCollector:
    name = "sizes"
    cached = True

    def collect(self, connection: Connection, options: Options) -> list[Metric]:
        datname = connection.exec_driver_sql("SELECT current_database()").scalar_one()
        return [
            self._databases(connection),
            self._tables(connection, options, datname),
            self._indexes(connection, options, datname),
        ]

    def _databases(self, connection: Connection) -> Metric:
        family = GaugeMetricFamily(
            "dbops_pg_database_size_bytes", "Disk space used by each database.", labels=["datname"]
        )
        for database in rows(connection, DATABASES):
            # One statement per database: a database dropped meanwhile costs only its own row.
            try:
                size = rows(connection, DATABASE_SIZE, oid=database.oid)[0].bytes
            except exc.DBAPIError as error:
                if error.connection_invalidated:
                    raise
                log.debug("size of database %s unavailable: %s", database.datname, error.orig)
                continue
            if size is not None:
                family.add_metric([database.datname], float(size))
        return family

    def _tables(self, connection: Connection, options: Options, datname: str) -> Metric:
        family = GaugeMetricFamily(
            "dbops_pg_table_size_bytes",
            f"Table size without indexes: the {options.top_n} largest, then one {OTHER} sum.",
            labels=["datname", "schema", "table"],
        )
        for row in rows(connection, TABLE_SIZES, top_n=options.top_n):
            family.add_metric(
                [datname, row.schema or OTHER, row.name or OTHER], float(row.bytes or 0)
            )
        return family

    def _indexes(self, connection: Connection, options: Options, datname: str) -> Metric:
        family = GaugeMetricFamily(
            "dbops_pg_index_size_bytes",
            f"Index size: the {options.top_n} largest, then one {OTHER} sum.",
            labels=["datname", "schema", "table", "index"],
        )
        for row in rows(connection, INDEX_SIZES, top_n=options.top_n):
            labels = [row.schema or OTHER, row.table_name or OTHER, row.name or OTHER]
            family.add_metric([datname, *labels], float(row.bytes or 0))
        return family
