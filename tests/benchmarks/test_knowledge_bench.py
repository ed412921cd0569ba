"""``ops db import-knowledge FILE`` against a plain ``COPY`` of the same rows, same run.

The export is generated in the shipped format: 200,000 lines of ~320 bytes (~64 MB), one in
five without an agent. Each round times, in rotated order: a bare ``COPY`` of the final rows
(agent ids resolved, arrays and JSON ready) into a table of ``knowledge_base``'s shape
(``LIKE ... INCLUDING ALL``: defaults, checks, unique and GIN indexes; plus the foreign key to
``agents``), and the CLI importing the file into an empty ``knowledge_base``; then the CLI
importing it again (every row unchanged). The CLI runs as a child process, timed and measured
(peak RSS from ``wait4``) by a small launcher. Printed: the times and the ratios against the
bare ``COPY`` (targets: the whole import <= 10 s, peak RSS <= 150 MB).
Asserts no time: the figures depend on the machine and its load.
Scale with DBOPS_BENCH_KNOWLEDGE_LINES (default 200000) and DBOPS_BENCH_KNOWLEDGE_ROUNDS (3).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine

from db.migrate import upgrade
from db.seed.agents import DEFAULT_AGENT_NAMES, seed_agents
from tests.conftest import REPO, Server, env_for

LINES = int(os.environ.get("DBOPS_BENCH_KNOWLEDGE_LINES", "200000"))
ROUNDS = int(os.environ.get("DBOPS_BENCH_KNOWLEDGE_ROUNDS", "3"))
COLUMNS = "external_id, agent_id, category, title, content, source, tags, metadata"
CATEGORIES = ("runbook", "incident", "howto", "decision", "pattern", "platform", "process")
SOURCES = ("incident:INC-", "doc:docs/", "pr:platform-api#", "chat:#platform-", "ticket:OPS-")
WORDS = (
    "pool",
    "connection",
    "replica",
    "vacuum",
    "index",
    "backup",
    "restore",
    "latency",
    "query",
    "lock",
    "timeout",
    "worker",
    "scheduler",
    "migration",
    "schema",
    "retention",
    "alert",
    "metric",
    "dashboard",
    "planner",
    "agent",
    "task",
    "workflow",
    "checkpoint",
    "wal",
    "replay",
    "standby",
    "partition",
    "analyze",
    "statistics",
    "cache",
    "buffer",
)


def _export_lines(count: int) -> list[dict[str, object]]:
    """Entries shaped like ``knowledge_base.jsonl``, sized so 200,000 of them make ~63 MB."""
    rng = random.Random(11)
    agents = sorted(DEFAULT_AGENT_NAMES)
    entries: list[dict[str, object]] = []
    for number in range(1, count + 1):
        words = rng.choices(WORDS, k=rng.randint(4, 8))
        entries.append(
            {
                "id": f"kb-{number:07d}",
                "agent": None if number % 5 == 0 else agents[number % len(agents)],
                "category": CATEGORIES[number % len(CATEGORIES)],
                "title": " ".join(rng.choices(WORDS, k=4)).capitalize(),
                "content": " ".join(words).capitalize() + ".",
                "source": f"{SOURCES[number % len(SOURCES)]}{rng.randint(1, 9999)}",
                "tags": rng.sample(WORDS, k=rng.randint(2, 3)),
                "metadata": {
                    "confidence": round(rng.random(), 2),
                    "learned_at": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
                    "T10:00:00Z",
                    "version": rng.randint(1, 3),
                },
            }
        )
    return entries


def _csv(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _copy_rows(entries: list[dict[str, object]], agent_ids: dict[str, str]) -> str:
    """The rows the import ends with, as COPY CSV: what a bare COPY of them has to load."""
    rows = []
    for entry in entries:
        tags = "{" + ",".join('"' + str(tag) + '"' for tag in entry["tags"]) + "}"  # type: ignore[attr-defined]
        agent = entry["agent"]
        rows.append(
            ",".join(
                [
                    _csv(str(entry["id"])),
                    agent_ids[str(agent)] if agent is not None else "",
                    _csv(str(entry["category"])),
                    _csv(str(entry["title"])),
                    _csv(str(entry["content"])),
                    _csv(str(entry["source"])),
                    _csv(tags),
                    _csv(json.dumps(entry["metadata"])),
                ]
            )
        )
    return "\n".join(rows) + "\n"


def _time_bare_copy(engine: Engine, rows: Path) -> float:
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE knowledge_copy"))
    with engine.begin() as connection:
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        started = time.perf_counter()
        with rows.open("rb") as source:
            cursor.copy_expert(
                f"COPY knowledge_copy ({COLUMNS}) FROM STDIN WITH (FORMAT csv)", source, 1 << 18
            )
        elapsed = time.perf_counter() - started
    return elapsed


# Starts the command and reports its wall time and peak RSS from wait4. A child's ru_maxrss
# starts from the RSS of the process it was forked from, so it is forked from this small
# launcher rather than from pytest, which holds the generated export.
LAUNCHER = """
import os, subprocess, sys, time
started = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(f"{time.perf_counter() - started} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run_import(url: URL, export: Path) -> tuple[float, float, str]:
    """Seconds, peak RSS (MB) and stdout of ``ops db import-knowledge FILE`` as a child process."""
    figures = export.with_suffix(".figures")
    command = [sys.executable, "-m", "ops.cli", "db", "import-knowledge", str(export)]
    done = subprocess.run(
        [sys.executable, "-I", "-c", LAUNCHER, str(figures), *command],
        env=env_for(url),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr
    elapsed, peak_kib = figures.read_text().split()
    return float(elapsed), int(peak_kib) / 1024, done.stdout.strip()


def _time_fresh_import(engine: Engine, url: URL, export: Path) -> tuple[float, float, str]:
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE knowledge_base"))
    return _run_import(url, export)


def test_import_knowledge_against_bare_copy(pg: Server, tmp_path: Path) -> None:
    database = pg.create_database()
    url = pg.url(database)
    engine = create_engine(url)
    try:
        upgrade(engine)
        with engine.begin() as connection:
            seed_agents(connection)
            agent_ids = {
                name: str(agent_id)
                for name, agent_id in connection.execute(text("SELECT name, id FROM agents"))
            }
            connection.execute(
                text("CREATE TABLE knowledge_copy (LIKE knowledge_base INCLUDING ALL)")
            )
            # LIKE copies defaults, checks and indexes; the foreign key's trigger is shape too.
            connection.execute(
                text(
                    "ALTER TABLE knowledge_copy ADD FOREIGN KEY (agent_id) REFERENCES agents (id)"
                    " ON DELETE SET NULL"
                )
            )
        started = time.perf_counter()
        entries = _export_lines(LINES)
        export = tmp_path / "export.jsonl"
        with export.open("w", encoding="utf-8") as out:
            for entry in entries:
                out.write(json.dumps(entry) + "\n")
        rows = tmp_path / "rows.csv"
        rows.write_text(_copy_rows(entries, agent_ids), encoding="utf-8")
        del entries
        tiny = tmp_path / "one.jsonl"
        with export.open("rb") as source:
            tiny.write_bytes(source.readline())
        print(
            f"\ngenerated {LINES} lines, {export.stat().st_size / 1e6:.1f} MB "
            f"(COPY CSV {rows.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f}s"
        )

        bare: list[float] = []
        fresh: list[float] = []
        again: list[float] = []
        rss: list[float] = []
        outputs: list[str] = []

        def fresh_import() -> float:
            elapsed, peak, out = _time_fresh_import(engine, url, export)
            rss.append(peak)
            outputs.append(out)
            return elapsed

        def reimport() -> float:
            elapsed, peak, out = _run_import(url, export)
            rss.append(peak)
            outputs.append(out)
            return elapsed

        for round_number in range(1, ROUNDS + 1):
            runs = [
                (bare, lambda: _time_bare_copy(engine, rows)),
                (fresh, fresh_import),
            ]
            shift = round_number % len(runs)
            for figures, measure in runs[shift:] + runs[:shift]:
                figures.append(measure())
            again.append(reimport())
            print(
                f"round {round_number}: bare COPY {bare[-1]:.2f}s  import into empty "
                f"{fresh[-1]:.2f}s  re-import (unchanged) {again[-1]:.2f}s  "
                f"peak RSS {max(rss[-2:]):.0f} MB"
            )
        start_up, start_rss, _ = _run_import(url, tiny)
        print("last outputs: " + " | ".join(outputs[-2:]))
        bare_median, fresh_median = statistics.median(bare), statistics.median(fresh)
        again_median = statistics.median(again)
        print(
            f"median of {ROUNDS}: bare COPY {bare_median:.2f}s, import {fresh_median:.2f}s "
            f"(ratio {fresh_median / bare_median:.2f}x), re-import {again_median:.2f}s "
            f"(ratio {again_median / bare_median:.2f}x)"
        )
        print(
            f"best of {ROUNDS}: bare COPY {min(bare):.2f}s, import {min(fresh):.2f}s "
            f"(ratio {min(fresh) / min(bare):.2f}x), re-import {min(again):.2f}s"
        )
        print(
            f"peak RSS of the import process: max {max(rss):.0f} MB over {len(rss)} runs; "
            f"a one-line import (start-up, connection) {start_up:.2f}s, {start_rss:.0f} MB"
        )
    finally:
        engine.dispose()
        pg.drop_database(database)
