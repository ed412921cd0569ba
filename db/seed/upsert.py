"""Idempotent bulk upserts that know exactly what they changed.

``INSERT ... ON CONFLICT DO UPDATE ... WHERE (columns) IS DISTINCT FROM (excluded)`` touches a
row only when a value differs, so a re-run writes nothing and fires no ``updated_at`` trigger.
``RETURNING (xmax = 0)`` tells an inserted row (no previous version) from an updated one; rows
the ``WHERE`` skipped return nothing, which makes them the unchanged ones. No row is read first,
so two processes seeding at once cannot both insert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, literal_column, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Executable

CHUNK_ROWS = 500


@dataclass(frozen=True)
class UpsertCounts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0

    @property
    def changed(self) -> int:
        return self.inserted + self.updated

    def __add__(self, other: UpsertCounts) -> UpsertCounts:
        return UpsertCounts(
            self.inserted + other.inserted,
            self.updated + other.updated,
            self.unchanged + other.unchanged,
        )

    def as_dict(self) -> dict[str, int]:
        return {"inserted": self.inserted, "updated": self.updated, "unchanged": self.unchanged}

    def __str__(self) -> str:
        return f"{self.inserted} inserted, {self.updated} updated, {self.unchanged} unchanged"


def upsert(
    connection: Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    conflict: Sequence[str],
    update: Sequence[str],
) -> UpsertCounts:
    """Insert ``rows``; on a ``conflict`` key, update the ``update`` columns that differ."""
    total = UpsertCounts()
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = [dict(row) for row in rows[start : start + CHUNK_ROWS]]
        insert = pg_insert(table).values(chunk)
        current = tuple_(*(table.c[name] for name in update))
        proposed = tuple_(*(insert.excluded[name] for name in update))
        statement: Executable = insert.on_conflict_do_update(
            index_elements=list(conflict),
            set_={name: insert.excluded[name] for name in update},
            where=current.is_distinct_from(proposed),
        ).returning(literal_column("(xmax = 0)").label("inserted"))
        flags = connection.execute(statement).scalars().all()
        inserted = sum(1 for flag in flags if flag)
        total += UpsertCounts(inserted, len(flags) - inserted, len(chunk) - len(flags))
    return total
