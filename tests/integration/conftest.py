"""Fixtures the integration tests share beyond tests/conftest.py: the S3 server of
tests/objectstore.py (``object_store`` for the session, ``bucket`` per test)."""

from tests.objectstore import bucket, object_store

__all__ = ["bucket", "object_store"]
