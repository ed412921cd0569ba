"""What every server-side collector shares: its shape, its query helper, top-N capping.

A collector runs a few catalog or statistics queries on a connection it is handed and returns
metric families. It never opens connections, never sets timeouts and never catches errors: the
exporter does that once for all of them, so a collector stays a few lines of SQL and arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # ops.settings reads COLLECTOR_NAMES: `ops backup run` needs neither
    from prometheus_client.core import Metric
    from sqlalchemy.engine import Connection, Row

OTHER = "(other)"  # label value of the one series that sums everything past the top N


# Every collector of the exporter, by the name its errors and durations are labelled with.
# OPS_COLLECTORS_DISABLED names some of them (where CloudNativePG already exports the same).
COLLECTOR_NAMES = ("activity", "databases", "replication", "sizes", "indexes", "statements")


@dataclass(frozen=True)
class Options:
    """What collectors may vary by: how many series to keep before folding into a remainder."""

    top_n: int = 20


class Collector(Protocol):
    """One family of server metrics.

    ``cached`` collectors are expensive (they grow with the number of relations or statements):
    a scheduler job refreshes them every ``OPS_COLLECTOR_TTL`` and scrapes serve the result.
    """

    name: str
    cached: bool

    def collect(self, connection: Connection, options: Options) -> list[Metric]: ...


def rows(connection: Connection, sql: str, **params: Any) -> Sequence[Row[Any]]:
    from sqlalchemy import text

    return connection.execute(text(sql), params).all()
