"""``ops db import-knowledge`` with hostile exports, on a real PostgreSQL.

Every hostile line is one ``FILE:LINE: reason`` on stderr, exit 1, no traceback, no bare
database error, and ``knowledge_base`` exactly as it was. Valid but awkward text lands intact,
and in exactly the rows the previous statement-per-batch upsert wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL, Engine

from db.seed.agents import agent_ids, seed_agents
from db.seed.knowledge import (
    KNOWLEDGE_TABLE,
    MAX_LINE_BYTES,
    SEEDED_COLUMNS,
    SHIPPED_EXPORT,
    import_knowledge,
)
from db.seed.upsert import UpsertCounts, upsert
from tests.conftest import REPO, Server, env_for, run_ops
from tests.knowledge_lines import numbered_entry
from tests.pgcluster import wait_for

MakeEngine = Callable[..., Engine]
SNAPSHOT = "SELECT external_id, agent_id, tags, metadata, updated_at FROM knowledge_base ORDER BY 1"


@pytest.fixture
def seeded(migrated_db: URL, engine_for: MakeEngine) -> Engine:
    """Agents and the shipped knowledge in place: what a hostile import must leave alone."""
    engine = engine_for(migrated_db)
    with engine.begin() as connection:
        seed_agents(connection)
        import_knowledge(connection, SHIPPED_EXPORT)
    return engine


def snapshot(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(SNAPSHOT))]


def entry(number: int, **changes: object) -> dict[str, object]:
    return numbered_entry("h", number, **changes)


def good_line(number: int, **changes: object) -> str:
    return json.dumps(entry(number, **changes))


def with_metadata(number: int, raw_value: str) -> str:
    """A line whose ``metadata.v`` is ``raw_value`` exactly as written (maybe not valid JSON)."""
    return good_line(number, metadata={"v": 0}).replace('"v": 0', f'"v": {raw_value}')


def import_file(engine: Engine, path: Path) -> tuple[int, list[str], str]:
    done = run_ops("db", "import-knowledge", str(path), env=env_for(engine.url))
    return done.returncode, done.stderr.splitlines(), done.stdout


HOSTILE = {
    "nul in tags": (
        good_line(3, tags=["ok", "a\x00b"]),
        "field 'tags' contains a NUL character",
    ),
    "nul in a metadata key": (
        good_line(3, metadata={"a\x00": 1}),
        "field 'metadata' contains a NUL character",
    ),
    "lone surrogate": (
        good_line(3, title="x").replace('"x"', '"\\ud800"'),
        "field 'title' contains an unpaired UTF-16 surrogate, which is not text",
    ),
    "lone surrogate in metadata": (
        with_metadata(3, '"\\udfff"'),
        "field 'metadata' contains an unpaired UTF-16 surrogate, which is not text",
    ),
    "integer of 5000 digits": (
        with_metadata(3, "1" * 5000),
        "invalid JSON: an integer of 5000 digits (at most 4300)",
    ),
    "deeply nested arrays": (
        with_metadata(3, "[" * 100_000 + "]" * 100_000),
        "invalid JSON: nested more than 64 levels deep",
    ),
    "metadata nested 65 levels": (
        with_metadata(3, "[" * 65 + "]" * 65),
        "field 'metadata' is nested more than 64 levels deep",
    ),
    "NaN": (with_metadata(3, "NaN"), "invalid JSON: NaN is not a JSON number"),
    "Infinity": (with_metadata(3, "-Infinity"), "invalid JSON: -Infinity is not a JSON number"),
    "overflowing float": (
        with_metadata(3, "1e999"),
        "invalid JSON: number '1e999' is out of range for a double",
    ),
    "unknown agent": (good_line(3, agent="nobody"), "unknown agent 'nobody'"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_line_is_one_clear_error_and_nothing_is_written(
    seeded: Engine, tmp_path: Path, case: str
) -> None:
    hostile, reason = HOSTILE[case]
    path = tmp_path / "export.jsonl"
    path.write_text("\n".join([good_line(1), good_line(2), hostile, good_line(4)]) + "\n")
    before = snapshot(seeded)
    code, err, out = import_file(seeded, path)
    assert code == 1 and out == ""
    assert err == [
        f"{path}:3: {reason}",
        "ops db: import rejected: 1 problem(s), nothing was written",
    ]
    assert snapshot(seeded) == before


def test_every_problem_is_reported_in_one_run(seeded: Engine, tmp_path: Path) -> None:
    path = tmp_path / "export.jsonl"
    lines = [good_line(0)] + [hostile for hostile, _ in HOSTILE.values()] + ["{broken"]
    path.write_text("\n".join(lines) + "\n")
    before = snapshot(seeded)
    code, err, _ = import_file(seeded, path)
    assert code == 1
    expected = [f"{path}:{n}: {reason}" for n, (_, reason) in enumerate(HOSTILE.values(), 2)]
    assert err[: len(HOSTILE)] == expected
    assert err[len(HOSTILE)].startswith(f"{path}:{len(HOSTILE) + 2}: invalid JSON")
    assert err[-1] == f"ops db: import rejected: {len(HOSTILE) + 1} problem(s), nothing was written"
    assert not any("Traceback" in line or "database error" in line for line in err)
    assert snapshot(seeded) == before


def test_repeated_ids_are_found_by_the_database_and_listed_in_line_order(
    seeded: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "export.jsonl"
    lines = [good_line(1), "{oops", good_line(1), good_line(4, agent="ghost"), good_line(1)]
    lines += [good_line(n) for n in range(6, 40_000)] + [good_line(7)]
    path.write_text("\n".join(lines) + "\n")
    before = snapshot(seeded)
    code, err, _ = import_file(seeded, path)
    assert code == 1
    assert err[0].startswith(f"{path}:2: invalid JSON")
    assert err[1:] == [
        f"{path}:3: duplicate id 'h-1' (first on line 1)",
        f"{path}:4: unknown agent 'ghost'",
        f"{path}:5: duplicate id 'h-1' (first on line 1)",
        f"{path}:{len(lines)}: duplicate id 'h-7' (first on line 7)",
        "ops db: import rejected: 5 problem(s), nothing was written",
    ]
    assert snapshot(seeded) == before


def test_problems_past_one_hundred_are_counted(seeded: Engine, tmp_path: Path) -> None:
    path = tmp_path / "export.jsonl"
    path.write_text("".join(good_line(n, agent=f"ghost-{n}") + "\n" for n in range(1, 151)))
    code, err, _ = import_file(seeded, path)
    assert code == 1 and len(err) == 102
    assert err[99] == f"{path}:100: unknown agent 'ghost-100'"
    assert err[100:] == [
        f"{path}: and 50 more",
        "ops db: import rejected: 150 problem(s), nothing was written",
    ]


def test_dev_zero_is_refused_at_the_line_cap(seeded: Engine) -> None:
    started = time.monotonic()
    code, err, _ = import_file(seeded, Path("/dev/zero"))
    assert code == 1
    assert err == [
        f"/dev/zero:1: line longer than {MAX_LINE_BYTES} bytes; stopped reading",
        "ops db: import rejected: 1 problem(s), nothing was written",
    ]
    assert time.monotonic() - started < 60


AWKWARD = [
    entry(
        1,
        content="line\u2028separator, paragraph\u2029, NEL\x85 and a real\nnewline\r\n\\.\nend",
        title='Quotes " and \\ backslashes, commas, {braces}',
        tags=['a "quoted" tag', "back\\slash", "{brace,comma}", "NULL", " spaced ", "ünï"],
        metadata={"float": 1e2, "tiny": 1e-7, "big": int("9" * 4300), "text": "é\u2028\t"},
    ),
    entry(2, agent=None, tags=[], metadata={"nested": [{"k": [1, 2.5, None, True]}]}),
    entry(3, content="emoji \U0001f680 and \\ud83d\\ude80 escaped", source="x" * 500),
]


def test_awkward_but_valid_text_lands_intact_and_as_the_row_upsert_wrote(
    seeded: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "export.jsonl"
    # \r\n endings are tolerated; U+2028 and NEL are written raw, not escaped.
    path.write_bytes(
        b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\r\n" for e in AWKWARD)
    )
    code, _, out = import_file(seeded, path)
    assert (code, out.strip()) == (0, "knowledge: 3 inserted, 0 updated, 0 unchanged")
    with seeded.connect() as connection:
        stored = {
            row.external_id: row
            for row in connection.execute(
                text(
                    "SELECT k.*, a.name AS agent FROM knowledge_base k"
                    " LEFT JOIN agents a ON a.id = k.agent_id WHERE external_id LIKE 'h-%'"
                )
            )
        }
    for expected in AWKWARD:
        row = stored[str(expected["id"])]
        assert (row.agent, row.title, row.content, row.source) == (
            expected["agent"],
            expected["title"],
            expected["content"],
            expected["source"],
        )
        assert row.tags == expected["tags"] and row.metadata == expected["metadata"]
    # The previous import wrote through the ORM's JSONB and ARRAY binds, row by row; the same
    # entries upserted that way change nothing: the rows are the same values.
    with seeded.begin() as connection:
        agents = agent_ids(connection, {str(e["agent"]) for e in AWKWARD if e["agent"]})
        rows = [
            {
                "external_id": e["id"],
                "agent_id": agents.get(str(e["agent"])),
                **{name: e[name] for name in SEEDED_COLUMNS[1:]},
            }
            for e in AWKWARD
        ]
        counts = upsert(
            connection, KNOWLEDGE_TABLE, rows, conflict=("external_id",), update=SEEDED_COLUMNS
        )
    assert counts == UpsertCounts(0, 0, len(AWKWARD))
    code, _, out = import_file(seeded, path)
    assert (code, out.strip()) == (0, "knowledge: 0 inserted, 0 updated, 3 unchanged")


def test_a_character_the_server_encoding_lacks_is_reported_with_its_line(
    pg: Server, engine_for: MakeEngine, tmp_path: Path
) -> None:
    from db.migrate import upgrade

    name = pg.create_database()
    pg.drop_database(name)
    pg.execute(
        f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'LATIN1'"
        " LC_COLLATE 'C' LC_CTYPE 'C'"
    )
    try:
        engine = engine_for(pg.url(name))
        upgrade(engine)
        with engine.begin() as connection:
            seed_agents(connection)
        path = tmp_path / "export.jsonl"
        lines = [
            good_line(1, content="three\nquoted\nnewlines\nbefore"),
            good_line(2, title="café is Latin-1"),
            good_line(3, title="the euro sign \u20ac is not"),
            good_line(4),
        ]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        code, err, _ = import_file(engine, path)
        assert code == 1
        assert err[0] == (
            f"{path}:3: character '\u20ac' cannot be stored in the database's encoding LATIN1"
        )
        assert err[1] == "ops db: import rejected: 1 problem(s), nothing was written"
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM knowledge_base")).scalar() == 0
    finally:
        pg.drop_database(name)


def test_a_statement_timeout_does_not_cut_a_large_import_short(
    migrated_db: URL, engine_for: MakeEngine, tmp_path: Path
) -> None:
    engine = engine_for(migrated_db, connect_args={"options": "-c statement_timeout=300"})
    with engine.begin() as connection:
        seed_agents(connection)
    path = tmp_path / "export.jsonl"
    total = 60_000
    path.write_text("".join(good_line(n) + "\n" for n in range(total)))
    with engine.begin() as connection:
        counts = import_knowledge(connection, path)
        # the server's limit is back for whatever the caller runs next in this transaction
        assert connection.execute(text("SHOW statement_timeout")).scalar() == "300ms"
    assert counts == UpsertCounts(total, 0, 0)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM knowledge_base")).scalar() == total


def copying(engine: Engine) -> bool:
    with engine.connect() as connection:
        found = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY%' "
                "AND pid <> pg_backend_pid()"
            )
        ).scalar()
    return bool(found)


def test_ctrl_c_while_reading_a_pipe_exits_130_and_writes_nothing(
    seeded: Engine, tmp_path: Path
) -> None:
    fifo = tmp_path / "export.fifo"
    os.mkfifo(fifo)
    before = snapshot(seeded)
    child = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "db", "import-knowledge", str(fifo)],
        env=env_for(seeded.url),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with fifo.open("w") as sink:  # returns once the import has opened the pipe
            sink.write("".join(good_line(n) + "\n" for n in range(1, 101)))
            sink.flush()
            # the import is in its COPY, waiting for more lines, before it is interrupted
            assert wait_for(lambda: copying(seeded), 30), "the import never reached its COPY"
            child.send_signal(signal.SIGINT)
            out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130 and out == "", err
    assert err.splitlines()[-1] == "interrupted"
    assert "Traceback" not in err and "database error" not in err
    assert snapshot(seeded) == before
