"""Migrating the previous knowledge store's export into ``knowledge_base``.

The export is JSON Lines, one entry an object. The whole file is checked before anything is
written, and every bad line is reported as ``FILE:LINE: reason`` so a broken export is fixed in
one pass. The import itself is one statement batch inside the caller's transaction: a file
either lands completely or not at all. Entries are matched on their stable ``id``
(``external_id``), so importing a newer export updates what changed and leaves the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Connection

from db.models import KnowledgeEntry
from db.seed.agents import agent_ids
from db.seed.upsert import CHUNK_ROWS, UpsertCounts, upsert

SHIPPED_EXPORT = Path(__file__).resolve().parent / "knowledge_base.jsonl"
KNOWLEDGE_TABLE: Table = KnowledgeEntry.__table__  # type: ignore[assignment]
SEEDED_COLUMNS = ("agent_id", "category", "title", "content", "source", "tags", "metadata")

# field: (types allowed, longest text allowed, may be null)
_FIELDS: dict[str, tuple[tuple[type, ...], int | None, bool]] = {
    "id": ((str,), 200, False),
    "agent": ((str,), 100, True),
    "category": ((str,), 100, False),
    "title": ((str,), 300, False),
    "content": ((str,), None, False),
    "source": ((str,), 500, False),
    "tags": ((list,), None, False),
    "metadata": ((dict,), None, False),
}


@dataclass(frozen=True)
class KnowledgeRecord:
    line: int
    external_id: str
    agent: str | None
    category: str
    title: str
    content: str
    source: str
    tags: list[str]
    metadata: dict[str, Any]


@dataclass
class ParsedExport:
    path: Path
    records: list[KnowledgeRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class KnowledgeImportError(Exception):
    """The export is malformed; ``errors`` holds one ``FILE:LINE: reason`` per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _entry_problems(entry: Any) -> list[str]:
    if not isinstance(entry, dict):
        return [f"expected a JSON object, got {type(entry).__name__}"]
    problems = [f"missing field {name!r}" for name in _FIELDS if name not in entry]
    problems += [f"unknown field {name!r}" for name in entry if name not in _FIELDS]
    for name, (types, longest, nullable) in _FIELDS.items():
        value = entry.get(name)
        if name not in entry or (value is None and nullable):
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            expected = " or ".join("string" if t is str else t.__name__ for t in types)
            problems.append(f"field {name!r} must be {expected}, got {type(value).__name__}")
        elif isinstance(value, str):
            if not value.strip():
                problems.append(f"field {name!r} is empty")
            elif "\x00" in value:
                problems.append(f"field {name!r} contains a NUL character")
            elif longest is not None and len(value) > longest:
                problems.append(f"field {name!r} is longer than {longest} characters")
    tags = entry.get("tags")
    if isinstance(tags, list) and not all(isinstance(tag, str) and tag.strip() for tag in tags):
        problems.append("field 'tags' must be a list of non-empty strings")
    return problems


def parse_lines(lines: Iterable[str], path: Path) -> ParsedExport:
    """Check every line of an export; collect the good records and every problem."""
    parsed = ParsedExport(path)
    first_seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            parsed.errors.append(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        problems = _entry_problems(entry)
        if not problems and entry["id"] in first_seen:
            problems.append(
                f"duplicate id {entry['id']!r} (first on line {first_seen[entry['id']]})"
            )
        if problems:
            parsed.errors.extend(f"{path}:{number}: {problem}" for problem in problems)
            continue
        first_seen[entry["id"]] = number
        parsed.records.append(
            KnowledgeRecord(
                line=number,
                external_id=entry["id"],
                agent=entry["agent"],
                category=entry["category"],
                title=entry["title"],
                content=entry["content"],
                source=entry["source"],
                tags=entry["tags"],
                metadata=entry["metadata"],
            )
        )
    if not parsed.records and not parsed.errors:
        parsed.errors.append(f"{path}:0: no entries in the file")
    return parsed


def parse_export(path: Path) -> ParsedExport:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        return ParsedExport(path, errors=[f"{path}:{line}: not UTF-8 text"])
    except OSError as exc:
        return ParsedExport(path, errors=[f"{path}:0: cannot read: {exc.strerror or exc}"])
    return parse_lines(text.splitlines(), path)


def import_knowledge(
    connection: Connection, path: Path, progress: Callable[[int, int], None] | None = None
) -> UpsertCounts:
    """Validate ``path`` completely, then upsert it; raises before writing if anything is wrong.

    ``progress(done, total)`` is called after validation (done = 0) and after each batch.
    """
    parsed = parse_export(path)
    if parsed.errors:
        raise KnowledgeImportError(parsed.errors)
    agents = agent_ids(connection, {r.agent for r in parsed.records if r.agent is not None})
    unknown = [
        f"{path}:{r.line}: unknown agent {r.agent!r}"
        for r in parsed.records
        if r.agent is not None and r.agent not in agents
    ]
    if unknown:
        raise KnowledgeImportError(unknown)
    rows = [
        {
            "external_id": r.external_id,
            "agent_id": agents.get(r.agent) if r.agent is not None else None,
            "category": r.category,
            "title": r.title,
            "content": r.content,
            "source": r.source,
            "tags": r.tags,
            "metadata": r.metadata,
        }
        for r in parsed.records
    ]
    total = UpsertCounts()
    if progress is not None:
        progress(0, len(rows))
    for start in range(0, len(rows), CHUNK_ROWS):
        batch = rows[start : start + CHUNK_ROWS]
        total += upsert(
            connection, KNOWLEDGE_TABLE, batch, conflict=("external_id",), update=SEEDED_COLUMNS
        )
        if progress is not None:
            progress(start + len(batch), len(rows))
    return total
