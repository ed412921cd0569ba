"""A frozen server (every PostgreSQL process stopped with SIGSTOP) must not hang the scrape.

Server-side timeouts cannot fire on a frozen server; the scrape still answers ``dbops_pg_up 0``
by its deadline, later scrapes do not pile up connections, and it recovers after SIGCONT.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ops.collectors.exporter import ServerExporter, exporter_engine
from ops.settings import load_settings
from tests.pgcluster import Cluster, wait_for


def cluster_pids(cluster: Cluster) -> list[int]:
    postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            children.append(int(stat.parent.name))
    return [postmaster, *children]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    own = Cluster().start()
    try:
        yield own
    finally:
        own.stop()


def test_scrape_answers_down_by_its_deadline_when_the_server_is_frozen(cluster: Cluster) -> None:
    settings = load_settings(
        {
            "DATABASE_URL": cluster.url().render_as_string(hide_password=False),
            "OPS_QUERY_TIMEOUT": "500ms",
        }
    )
    engine = exporter_engine(settings)
    exporter = ServerExporter(engine, timeout=0.5, refresh_timeout=0.5)
    registry = CollectorRegistry()
    registry.register(exporter)

    def up() -> float | None:
        return registry.get_sample_value("dbops_pg_up")

    assert up() == 1
    with engine.connect(), engine.connect():
        pass  # both pooled connections are open before the freeze
    frozen = cluster_pids(cluster)
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        timings = []
        for _ in range(3):
            started = time.monotonic()
            body = generate_latest(registry).decode()
            timings.append(time.monotonic() - started)
            assert "dbops_pg_up 0.0" in body
        assert timings[0] < exporter.deadline + 1.5, timings  # the stuck scrape's deadline
        assert max(timings[1:]) < 1.5, timings  # later ones do not wait behind it
        assert engine.pool.checkedout() == 1  # only the stuck scrape holds a connection
        started = time.monotonic()
        exporter.refresh()  # the scheduler's job returns; its stuck worker is a daemon thread
        assert time.monotonic() - started < 0.5 * 3 + exporter.deadline + 1.5
        assert engine.pool.checkedout() == 2  # the pool's bound, with both stuck
        started = time.monotonic()
        exporter.refresh()  # the next one sees the stuck refresh and skips at once
        assert time.monotonic() - started < 0.5
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert wait_for(lambda: up() == 1, 20)
    engine.dispose()
