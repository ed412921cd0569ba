"""Alembic environment.

The URL comes from :mod:`db.settings`, never from ``alembic.ini`` (whose ``%`` interpolation
mangles passwords). A caller may hand over a connection in ``config.attributes["connection"]``,
as :mod:`db.migrate` and the tests do.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from db.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        compare_type=True,
        transaction_per_migration=False,
    )


def run_offline() -> None:
    from db.settings import load_db_settings

    context.configure(
        url=load_db_settings().url.sqlalchemy(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from db.settings import load_db_settings

    engine = create_engine(load_db_settings().url.sqlalchemy(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
