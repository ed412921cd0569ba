"""Connections and transactions, from ``pg_stat_activity`` and ``pg_settings`` (scrape time).

Saturation needs both sides: how many client connections exist per database, state and
application, and how many the server accepts (``max_connections`` less the reserved slots).
"""

from __future__ import annotations

from collections import Counter

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy.engine import Connection

from ops.backup.pgtools import OWN_APPLICATION_NAMES
from ops.collectors.base import OTHER, Options, rows

ACTIVITY = """
SELECT coalesce(datname, '') AS datname,
       coalesce(state, 'unknown') AS state,
       coalesce(application_name, '') AS application_name,
       count(*) AS connections
FROM pg_stat_activity
WHERE backend_type = 'client backend'
GROUP BY 1, 2, 3
"""

# The sidecar's own dumps, drills and restores hold one transaction for the whole job by design;
# counting them would make every large backup look like a stuck client.
TRANSACTIONS = """
SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0) AS longest,
       count(*) FILTER (
           WHERE state IN ('idle in transaction', 'idle in transaction (aborted)')
       ) AS idle_in_transaction
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
  AND coalesce(application_name, '') <> ALL (:own)
"""

LIMITS = """
SELECT name, setting::bigint AS value
FROM pg_settings
WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections')
"""


class ActivityCollector:
    name = "activity"
    cached = False

    def collect(self, connection: Connection, options: Options) -> list[Metric]:
        groups = [
            ((row.datname, row.state, row.application_name), int(row.connections))
            for row in rows(connection, ACTIVITY)
        ]
        # application_name is chosen by clients: keep the busiest names, fold the rest.
        per_application: Counter[str] = Counter()
        for (_, _, application), count in groups:
            per_application[application] += count
        kept = {name for name, _ in per_application.most_common(options.top_n)}
        folded: Counter[tuple[str, str, str]] = Counter()
        for (datname, state, application), count in groups:
            folded[(datname, state, application if application in kept else OTHER)] += count
        connections = GaugeMetricFamily(
            "dbops_pg_connections",
            "Client connections by database, state and application_name.",
            labels=["datname", "state", "application_name"],
        )
        for labels, count in sorted(folded.items()):
            connections.add_metric(list(labels), count)

        transaction = rows(connection, TRANSACTIONS, own=list(OWN_APPLICATION_NAMES))[0]
        longest = GaugeMetricFamily(
            "dbops_pg_longest_transaction_seconds",
            "Age of the oldest open client transaction, the sidecar's own backup jobs excepted.",
            value=float(transaction.longest),
        )
        idle = GaugeMetricFamily(
            "dbops_pg_idle_in_transaction_connections",
            "Client connections idle inside an open transaction.",
            value=int(transaction.idle_in_transaction),
        )

        limits = {row.name: int(row.value) for row in rows(connection, LIMITS)}
        maximum = GaugeMetricFamily(
            "dbops_pg_max_connections",
            "max_connections of the server.",
            value=limits.get("max_connections", 0),
        )
        reserved = GaugeMetricFamily(
            "dbops_pg_reserved_connections",
            "Connection slots reserved for superusers (and pg_use_reserved_connections).",
            value=limits.get("superuser_reserved_connections", 0)
            + limits.get("reserved_connections", 0),
        )
        return [connections, longest, idle, maximum, reserved]
