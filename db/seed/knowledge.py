"""Migrating the previous knowledge store's export into ``knowledge_base``.

The file is streamed: each line is checked (:mod:`db.seed.knowledge_export`) and each good one
sent straight into a ``COPY`` to a temporary table, so memory does not grow with the file.
Every problem, unknown agents and repeated ids included, is reported after that one pass as
``FILE:LINE: reason``. Only a clean file reaches ``knowledge_base``, through
``INSERT ... SELECT ... ON CONFLICT`` from the temporary table in the caller's transaction: a
file lands completely or not at all. Entries are matched on their stable ``id``
(``external_id``), so importing a newer export updates what changed and leaves the rest; a
re-run writes nothing.
"""

from __future__ import annotations

import json
import re
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Table,
    Text,
    exc,
    func,
    literal_column,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from db.models import Agent, KnowledgeEntry
from db.seed.knowledge_entry import KnowledgeRecord
from db.seed.knowledge_export import (
    MAX_EXPORT_BYTES,
    MAX_LINE_BYTES,
    MAX_SHOWN_PROBLEMS,
    ExportChecker,
    KnowledgeImportError,
    ParsedExport,
    duplicate_id,
    parse_export,
    parse_lines,
    read_lines,
    records,
)
from db.seed.upsert import UpsertCounts

__all__ = [
    "MAX_EXPORT_BYTES",
    "MAX_LINE_BYTES",
    "SHIPPED_EXPORT",
    "KnowledgeImportError",
    "KnowledgeRecord",
    "ParsedExport",
    "import_knowledge",
    "parse_export",
    "parse_lines",
]

SHIPPED_EXPORT = Path(__file__).resolve().parent / "knowledge_base.jsonl"
KNOWLEDGE_TABLE: Table = KnowledgeEntry.__table__  # type: ignore[assignment]
AGENTS_TABLE: Table = Agent.__table__  # type: ignore[assignment]
SEEDED_COLUMNS = ("agent_id", "category", "title", "content", "source", "tags", "metadata")
CHUNK_ROWS = 25_000  # rows per upsert statement: one progress step
COPY_READ_BYTES = 1 << 18

# The staged entries: what the file says, agents still by name. ``seq`` numbers the rows in the
# order they were sent, ``line`` is where each came from.
STAGING = Table(
    "knowledge_import",
    MetaData(),
    Column("seq", Integer, nullable=False),
    Column("line", Integer, nullable=False),
    Column("external_id", Text, nullable=False),
    Column("agent", Text),
    Column("category", Text, nullable=False),
    Column("title", Text, nullable=False),
    Column("content", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("tags", ARRAY(Text), nullable=False),
    Column("metadata", JSONB, nullable=False),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)
_COPY_SQL = (
    f"COPY {STAGING.name} ({', '.join(c.name for c in STAGING.columns)}) "
    "FROM STDIN WITH (FORMAT csv, ENCODING '{encoding}')"
)
# Server encodings Python can write: rows are sent in the database's own encoding, so a
# character it cannot hold is found on its line here, not by the server somewhere in a buffer.
# UTF8 and SQL_ASCII (no conversion) take UTF-8; any other is converted by the server.
_CODECS = {
    "UTF8": "utf-8",
    "SQL_ASCII": "utf-8",
    "LATIN1": "latin-1",
    **{
        f"LATIN{n}": f"iso8859-{part}"
        for n, part in zip(range(2, 11), (2, 3, 4, 9, 10, 13, 14, 15, 16), strict=True)
    },
    **{f"ISO_8859_{n}": f"iso8859-{n}" for n in range(5, 9)},
    **{f"WIN{n}": f"cp{n}" for n in (866, 874, *range(1250, 1259))},
    "KOI8R": "koi8-r",
    "KOI8U": "koi8-u",
    "EUC_JP": "euc-jp",
    "EUC_JIS_2004": "euc-jis-2004",
    "EUC_KR": "euc-kr",
    "EUC_CN": "gb2312",
}
_COPY_CONTEXT = re.compile(r"COPY \w+, line (\d+)")
# Repeated ids among the staged rows, each after the line it first appeared on.
_DUPLICATES = text(
    f"""
    SELECT staged.line, staged.external_id, firsts.line AS first, count(*) OVER () AS total
    FROM {STAGING.name} AS staged
    JOIN (
        SELECT external_id, min(line) AS line FROM {STAGING.name}
        GROUP BY external_id HAVING count(*) > 1
    ) AS firsts ON firsts.external_id = staged.external_id AND staged.line > firsts.line
    ORDER BY staged.line
    LIMIT :shown
    """
)


_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps's other defaults, as the ORM used


def _csv(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _csv_array(values: list[str]) -> str:
    """A ``text[]`` literal, CSV-quoted: ``"{""a"",""b""}"``; elements escaped only if needed."""
    if not values:
        return '"{}"'
    plain = "".join(values)
    if '"' in plain or "\\" in plain:
        values = [v.replace("\\", "\\\\").replace('"', '\\"') for v in values]
        return _csv("{" + ",".join(f'"{v}"' for v in values) + "}")
    return '"{""' + '"",""'.join(values) + '""}"'


def _copy_row(seq: int, record: KnowledgeRecord) -> str:
    """One CSV row of ``STAGING``."""
    agent = "" if record.agent is None else _csv(record.agent)
    return (
        f"{seq},{record.line},{_csv(record.external_id)},{agent},{_csv(record.category)},"
        f"{_csv(record.title)},{_csv(record.content)},{_csv(record.source)},"
        f"{_csv_array(record.tags)},{_csv(_JSON.encode(record.metadata))}\n"
    )


class _CopySource:
    """A file-like ``read()`` over generated rows, so ``copy_expert`` streams them as made.

    psycopg2 turns anything raised in ``read()`` into ``QueryCanceled``; the original (Ctrl-C
    included) is kept in ``failure`` to be raised again once the COPY has been abandoned.
    """

    def __init__(self, rows: Iterator[bytes]) -> None:
        self._rows = rows
        self.failure: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        parts: list[bytes] = []
        length = 0
        try:
            for row in self._rows:
                parts.append(row)
                length += len(row)
                if 0 <= size <= length:
                    break
        except BaseException as failure:
            self.failure = failure
            raise
        return b"".join(parts)


def _stage(connection: Connection, path: Path, checker: ExportChecker, **caps: int) -> int:
    """COPY every good record of ``path`` into ``STAGING`` while checking the whole file.

    Returns the number of rows staged. Good rows are staged even after a problem, so that
    repeated ids are found across the whole file; the table is dropped unused then.
    """
    file_lines: array[int] = array("I")  # by seq: the line of the file the row came from
    copy_lines: array[int] = array("I")  # by seq: the last line of COPY input the row is on
    sent = 0
    raw: Any = connection.connection.driver_connection  # psycopg2's, for copy_expert
    server_encoding = raw.get_parameter_status("server_encoding") or "UTF8"
    codec = _CODECS.get(server_encoding, "utf-8")
    encoding = server_encoding if server_encoding in _CODECS else "UTF8"

    def rows() -> Iterator[bytes]:
        nonlocal sent
        for record in records(read_lines(path, checker, **caps), checker):
            row = _copy_row(len(file_lines) + 1, record)
            try:
                data = row.encode(codec)
            except UnicodeEncodeError as error:
                character = error.object[error.start : error.start + 1]
                checker.problem(
                    record.line,
                    f"character {character!r} cannot be stored in the database's "
                    f"encoding {server_encoding}",
                )
                continue
            sent += row.count("\n")  # quoted newlines count as lines in COPY's messages
            file_lines.append(record.line)
            copy_lines.append(sent)
            yield data

    STAGING.create(connection)
    statement = _COPY_SQL.format(encoding=encoding)
    cursor = raw.cursor()
    source = _CopySource(rows())
    try:
        cursor.copy_expert(statement, source, COPY_READ_BYTES)
    except psycopg2.Error as error:
        if source.failure is not None:
            raise source.failure from None
        if not isinstance(error, psycopg2.DataError | psycopg2.IntegrityError):
            raise exc.DBAPIError.instance(statement, None, error, psycopg2.Error) from error
        # Checked values should not get here. If one does, it is reported with the line COPY
        # was on (exact for a value; for an encoding PostgreSQL converts, where it was reading).
        where = _COPY_CONTEXT.search(error.diag.context or "")
        seq = bisect_left(copy_lines, int(where.group(1))) if where else len(file_lines)
        line = file_lines[seq] if seq < len(file_lines) else 0
        reason = (error.diag.message_primary or str(error)).splitlines()[0]
        raise KnowledgeImportError([f"{path}:{line}: the database refused it: {reason}"]) from None
    finally:
        cursor.close()
    return len(file_lines)


def _upsert_staged(connection: Connection, first: int, last: int) -> UpsertCounts:
    """Upsert staged rows ``first < seq <= last``, agents resolved by name as they are now."""
    source = select(
        STAGING.c.external_id,
        AGENTS_TABLE.c.id,
        *(STAGING.c[name] for name in SEEDED_COLUMNS[1:]),
    ).select_from(STAGING.outerjoin(AGENTS_TABLE, AGENTS_TABLE.c.name == STAGING.c.agent))
    insert = pg_insert(KNOWLEDGE_TABLE).from_select(
        ["external_id", *SEEDED_COLUMNS],
        source.where(STAGING.c.seq > first, STAGING.c.seq <= last),
    )
    current = tuple_(*(KNOWLEDGE_TABLE.c[name] for name in SEEDED_COLUMNS))
    proposed = tuple_(*(insert.excluded[name] for name in SEEDED_COLUMNS))
    written = (
        insert.on_conflict_do_update(
            index_elements=["external_id"],
            set_={name: insert.excluded[name] for name in SEEDED_COLUMNS},
            where=current.is_distinct_from(proposed),
        )
        .returning(literal_column("(xmax = 0)").label("inserted"))
        .cte("written")
    )
    inserted, changed = connection.execute(
        select(func.count().filter(written.c.inserted), func.count()).select_from(written)
    ).one()
    return UpsertCounts(inserted, changed - inserted, (last - first) - changed)


def _find_repeated_ids(connection: Connection, checker: ExportChecker) -> None:
    """Report ids staged more than once. A unique index is the cheap proof there are none."""
    try:
        with connection.begin_nested():
            connection.execute(text(f"CREATE UNIQUE INDEX ON {STAGING.name} (external_id)"))
        return
    except exc.IntegrityError:
        pass
    repeats = connection.execute(_DUPLICATES, {"shown": MAX_SHOWN_PROBLEMS}).all()
    found = [(row.line, duplicate_id(row.external_id, row.first)) for row in repeats]
    checker.add_problems(found, repeats[0].total if repeats else 0)


def import_knowledge(
    connection: Connection,
    path: Path,
    progress: Callable[[int, int], None] | None = None,
    **caps: int,
) -> UpsertCounts:
    """Check ``path`` completely, then upsert it; raises before ``knowledge_base`` is touched.

    ``progress(done, total)`` is called once the file is checked (done = 0) and after each
    batch. ``caps`` (``max_bytes``, ``max_line_bytes``) lower the reading limits.
    """
    known_agents = frozenset(connection.execute(select(AGENTS_TABLE.c.name)).scalars())
    checker = ExportChecker(path, known_agents, find_duplicates=False)
    # Reading the file paces the COPY, and a large export is written in large batches: a
    # per-statement limit meant for queries would cut the import short. Restored at the end.
    timeout = connection.execute(text("SELECT current_setting('statement_timeout')")).scalar()
    connection.execute(text("SET LOCAL statement_timeout = 0"))
    staged = _stage(connection, path, checker, **caps)
    _find_repeated_ids(connection, checker)
    if checker.total:
        STAGING.drop(connection)
        raise checker.error()
    if staged > CHUNK_ROWS:  # each batch then finds its rows without reading them all
        connection.execute(text(f"CREATE INDEX ON {STAGING.name} (seq)"))
    total = UpsertCounts()
    if progress is not None:
        progress(0, staged)
    for first in range(0, staged, CHUNK_ROWS):
        last = min(first + CHUNK_ROWS, staged)
        total += _upsert_staged(connection, first, last)
        if progress is not None:
            progress(last, staged)
    STAGING.drop(connection)
    connection.execute(
        text("SELECT set_config('statement_timeout', :timeout, true)"), {"timeout": timeout}
    )
    return total
