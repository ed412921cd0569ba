"""Replication lag (scrape time).

On a standby the lag is how far replay trails the primary's last commit, and 0 once replay has
caught up with everything received (an idle primary sends nothing, so "time since the last
replayed commit" would grow forever and page someone for nothing). On a primary it is the
largest ``replay_lag`` of its standbys, 0 when it has none or they are idle.
"""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy.engine import Connection

from ops.collectors.base import Options, rows

REPLICATION = """
SELECT pg_is_in_recovery() AS standby,
       CASE WHEN pg_is_in_recovery() THEN
           CASE WHEN pg_last_wal_receive_lsn() IS NULL
                  OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
                ELSE greatest(0, coalesce(
                    extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()), 0))
           END
       ELSE coalesce((SELECT max(extract(epoch FROM replay_lag)) FROM pg_stat_replication), 0)
       END AS lag,
       (SELECT count(*) FROM pg_stat_replication) AS standbys
"""


class ReplicationCollector:
    name = "replication"
    cached = False

    def collect(self, connection: Connection, options: Options) -> list[Metric]:
        row = rows(connection, REPLICATION)[0]
        return [
            GaugeMetricFamily(
                "dbops_pg_replication_lag_seconds",
                "Replay lag: of this standby, or the largest of this primary's standbys.",
                value=float(row.lag),
            ),
            GaugeMetricFamily(
                "dbops_pg_in_recovery", "1 on a standby, 0 on a primary.", value=int(row.standby)
            ),
            GaugeMetricFamily(
                "dbops_pg_standbys", "Standbys streaming from this server.", value=int(row.standbys)
            ),
        ]
