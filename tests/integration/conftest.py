"""Fixtures the integration tests share beyond tests/conftest.py: the S3 server of
tests/objectstore.py (``object_store`` for the session, ``bucket`` per test) and a PostgreSQL
cluster set up for Barman's streaming (``cluster``, one per test module)."""

from collections.abc import Iterator

import pytest

from tests.integration.pitr_helpers import start_pitr_cluster
from tests.objectstore import bucket, object_store
from tests.pgcluster import Cluster

__all__ = ["bucket", "cluster", "object_store"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A cluster with replication and WAL settings for Barman, shared by a module's tests."""
    started = start_pitr_cluster()
    try:
        yield started
    finally:
        started.stop()
