"""Shared by the backup integration tests: data to back up, the CLI, a dump held mid-flight."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from ops.backup.manifest import Manifest
from ops.backup.runner import run_backup
from ops.settings import Settings, load_settings
from tests.conftest import env_for, run_ops
from tests.pgcluster import wait_for

REPO = Path(__file__).resolve().parents[2]


def settings_for(url: URL, directory: Path, **extra: str) -> Settings:
    return load_settings(
        {
            "DATABASE_URL": url.render_as_string(hide_password=False),
            "BACKUP_DIR": str(directory),
            **extra,
        }
    )


def populate(url: URL, rows: int = 2000) -> None:
    """Awkward data: unicode, NULLs, bytea, jsonb, numerics, a sequence that moved on."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    """
                    CREATE TABLE payload (
                        id bigserial PRIMARY KEY, label text, body bytea, doc jsonb,
                        amount numeric(12, 2), at timestamptz);
                    CREATE SCHEMA "Odd Schema";
                    CREATE TABLE "Odd Schema"."Mixed Case" (k int PRIMARY KEY, v text);
                    """
                )
            )
            connection.execute(
                text(
                    """
                    INSERT INTO payload (label, body, doc, amount, at)
                    SELECT CASE WHEN g % 7 = 0 THEN NULL ELSE 'ünïcødé ' || g || E'\\ttab' END,
                           decode(md5(g::text), 'hex'),
                           jsonb_build_object('g', g, 'tags', jsonb_build_array('a', g % 3)),
                           (g * 1.25)::numeric(12, 2),
                           timestamptz '2026-01-01 00:00+00' + g * interval '1 minute'
                    FROM generate_series(1, :rows) g
                    """
                ),
                {"rows": rows},
            )
            connection.execute(
                text(
                    """INSERT INTO "Odd Schema"."Mixed Case"
                       SELECT g, repeat('x', g) FROM generate_series(1, 50) g"""
                )
            )
            connection.execute(text("SELECT setval('payload_id_seq', 100000)"))
    finally:
        engine.dispose()


def ops(url: URL, directory: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """``ops ARGS`` as an operator would run it, pointed at ``url`` and ``directory``."""
    return run_ops(*args, env=env_for(url, BACKUP_DIR=str(directory), **extra))


def pg_dump_processes(directory: Path) -> list[int]:
    """Pids of pg_dump processes writing into ``directory``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"pg_dump") and str(directory).encode() in b" ".join(argv):
            found.append(int(entry.name))
    return found


@dataclass
class HeldRun:
    """A backup run blocked behind a table lock, with what happened to it once released."""

    directory: Path
    lock_connection: object
    thread: threading.Thread
    result: list[Manifest] = field(default_factory=list)
    error: list[BaseException] = field(default_factory=list)

    def pg_dump_pid(self) -> int:
        assert wait_for(lambda: pg_dump_processes(self.directory), 20), "pg_dump never started"
        return pg_dump_processes(self.directory)[0]


@contextmanager
def run_held_by_lock(url: URL, directory: Path, settings: Settings) -> Iterator[HeldRun]:
    """Start a run while another transaction holds ACCESS EXCLUSIVE on ``payload``: the dump
    starts, then waits. The lock is released (and the run joined) when the block ends."""
    engine = create_engine(url)
    connection = engine.connect()
    connection.execute(text("LOCK TABLE payload IN ACCESS EXCLUSIVE MODE"))
    held: HeldRun

    def target() -> None:
        try:
            held.result.append(run_backup(settings))
        except BaseException as exc:
            held.error.append(exc)

    held = HeldRun(directory, connection, threading.Thread(target=target, daemon=True))
    held.thread.start()
    try:
        yield held
    finally:
        connection.rollback()
        connection.close()
        held.thread.join(60)
        engine.dispose()


# ``python -c lost_signal("SIGTERM") <ops arguments>`` runs the CLI and sends it that signal
# each time it starts a child process. Python runs the handler inside an at-fork callback and
# ignores the KeyboardInterrupt it raises: only a stop request the run keeps can stop it. The
# callback writes LOST_AT_FORK when the interrupt was raised there, the proof it was lost.
LOST_AT_FORK = "the interrupt was raised in an at-fork callback"


def lost_signal(name: str) -> str:
    return f"""
import os, signal, sys
from ops.cli import main

def send_at_fork():
    try:
        os.kill(os.getpid(), signal.{name})
        len("x")  # the handler runs here at the latest
    except KeyboardInterrupt:
        sys.stderr.write("{LOST_AT_FORK}\\n")
        raise

os.register_at_fork(after_in_parent=send_at_fork)
sys.exit(main())
"""


LOST_SIGTERM = lost_signal("SIGTERM")


@contextmanager
def cli_run_held_by_lock(
    url: URL, directory: Path, capture: bool = True, launcher: Sequence[str] = ("-m", "ops.cli")
) -> Iterator[subprocess.Popen[str]]:
    """``ops backup run`` as a separate process while another transaction holds ACCESS
    EXCLUSIVE on ``payload``: yielded once its pg_dump has started (and waits). The lock is
    released when the block ends; the process is the caller's to end. ``capture=False`` sends
    its output to /dev/null instead of pipes; ``launcher`` is what python runs (``-m ops.cli``)."""
    output = subprocess.PIPE if capture else subprocess.DEVNULL
    engine = create_engine(url)
    connection = engine.connect()
    connection.execute(text("LOCK TABLE payload IN ACCESS EXCLUSIVE MODE"))
    try:
        process = subprocess.Popen(
            [sys.executable, *launcher, "backup", "run"],
            env=env_for(url, BACKUP_DIR=str(directory)),
            cwd=REPO,
            stdout=output,
            stderr=output,
            text=True,
        )
        assert wait_for(lambda: pg_dump_processes(directory), 20), "pg_dump never started"
        yield process
    finally:
        connection.rollback()
        connection.close()
        engine.dispose()


def waiting_dump_backend(url: URL) -> int | None:
    """The server pid of pg_dump's session once it waits for a lock."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(
                text(
                    """SELECT pid FROM pg_stat_activity
                       WHERE application_name = 'dbops-pg_dump' AND datname = current_database()
                         AND wait_event_type = 'Lock'"""
                )
            ).scalar()
    finally:
        engine.dispose()


def data_only_dump(url: URL) -> str:
    """Every row and sequence value of the database as text, for an exact comparison."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = str(url.password or "")
    dumped = subprocess.run(
        [
            "pg_dump",
            "--data-only",
            "--no-comments",
            "--no-owner",
            f"--host={url.host}",
            f"--port={url.port}",
            f"--username={url.username}",
            str(url.database),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    # \restrict carries a random key per run; everything else must match byte for byte.
    return "\n".join(
        line for line in dumped.splitlines() if not line.startswith(("\\restrict", "\\unrestrict"))
    )
