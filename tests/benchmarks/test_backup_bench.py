"""``ops backup run`` against bare ``pg_dump`` on a ~1 GB database, same run, alternating.

Prints the ratio (target: at most 1.05x bare pg_dump), throughput, and the restore and
verify-drill times; and, on a small database, the fixed cost a CLI run adds to the dump.
Asserts no time: the figures depend on the machine and its load.
Scale with DBOPS_BENCH_SCALE (pgbench scale, default 60) and DBOPS_BENCH_RANDOM_MB (default 150).
"""

from __future__ import annotations

import compileall
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from ops.backup.manifest import BackupDirectory, checksum_dump, remove_path
from ops.backup.pgtools import find_tool, libpq_env
from ops.backup.prune import prune
from ops.backup.restore import restore_backup
from ops.backup.runner import TABLES_SQL, connect, count_rows, run_backup
from ops.backup.verify import drill
from tests.conftest import Server, env_for
from tests.integration.backup_helpers import REPO, settings_for
from tests.pgcluster import server_bindir

# Nine rounds: on a two-core machine single runs of the same dump vary by 10 % and more, and
# five rounds left the median moving by more than the 5 % the target allows.
ROUNDS = int(os.environ.get("DBOPS_BENCH_ROUNDS", "9"))
# Past pytest's default 300 s: on a loaded two-core machine the rounds, restore and drill take
# longer than that.
pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]
SCALE = int(os.environ.get("DBOPS_BENCH_SCALE", "60"))
RANDOM_MB = int(os.environ.get("DBOPS_BENCH_RANDOM_MB", "150"))
FIXED_COST_ROUNDS = 15


@pytest.fixture(scope="module", autouse=True)
def _bytecode() -> None:
    """The package's bytecode written first, as the image's ``compileall`` and a wheel's
    install do: a CLI run then measures the deployed start-up, not the compiling of every
    module that an editable checkout under ``PYTHONDONTWRITEBYTECODE`` repeats on each call."""
    for package in ("db", "ops"):
        compileall.compile_dir(REPO / package, quiet=1)


def _pgbench() -> str:
    candidate = server_bindir() / "pgbench"
    found = str(candidate) if candidate.exists() else shutil.which("pgbench")
    if not found:
        pytest.skip("pgbench not installed")
    return found


def _load(url: URL) -> None:
    started = time.perf_counter()
    subprocess.run(
        [_pgbench(), "-i", "-s", str(SCALE), "-I", "dtGvp", "-q"],
        env=libpq_env(url, "dbops-bench"),
        check=True,
        capture_output=True,
        timeout=1800,
    )
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text("CREATE EXTENSION IF NOT EXISTS pgcrypto"))
        connection.execute(text("CREATE TABLE random_text (id int PRIMARY KEY, body text)"))
        # base64 of random bytes: text that no compressor can shrink below ~75 %.
        connection.execute(
            text(
                "INSERT INTO random_text SELECT g, encode(gen_random_bytes(768), 'base64')"
                " FROM generate_series(1, :rows) g"
            ),
            {"rows": RANDOM_MB * 1024},
        )
        connection.execute(text("VACUUM ANALYZE random_text"))
    engine.dispose()
    print(
        f"\nloaded pgbench scale {SCALE} + {RANDOM_MB} MB random text in "
        f"{time.perf_counter() - started:.0f}s"
    )


def _database_size(url: URL) -> int:
    engine = create_engine(url)
    with engine.connect() as connection:
        size = int(
            connection.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
        )
    engine.dispose()
    return size


def _time_bare_pg_dump(url: URL, output: Path) -> float:
    tool = find_tool("pg_dump", None)
    started = time.perf_counter()
    subprocess.run(
        [tool.path, "--format=custom", "-Z", "1", f"--file={output}"],
        env=libpq_env(url, "dbops-bench-bare"),
        check=True,
        timeout=1800,
    )
    elapsed = time.perf_counter() - started
    remove_path(output)
    return elapsed


def _time_ops_backup_run(url: URL, directory: Path) -> float:
    env = env_for(url, BACKUP_DIR=str(directory), BACKUP_FORMAT="custom", BACKUP_COMPRESSION="1")
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "ops.cli", "backup", "run"],
        env=env,
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=1800,
    )
    return time.perf_counter() - started


def _time_in_process_run(url: URL, directory: Path) -> float:
    """What the sidecar's scheduled run costs: the same work without starting a process."""
    settings = settings_for(url, directory, BACKUP_FORMAT="custom", BACKUP_COMPRESSION="1")
    started = time.perf_counter()
    run_backup(settings, after_success=lambda _: prune(settings, locked=True))
    return time.perf_counter() - started


def _time_cli_start(url: URL, directory: Path) -> float:
    """Python start-up plus importing every ``ops`` command: a fixed cost of any CLI call."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "ops.cli", "backup", "list"],
        env=env_for(url, BACKUP_DIR=str(directory)),
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def test_fixed_cost_of_a_cli_run(pg: Server, tmp_path: Path) -> None:
    """What a CLI run adds whatever the size: ``ops backup run`` against bare ``pg_dump`` on a
    small database (one table of 1,000 rows), alternated, so the dump itself costs next to
    nothing and the difference is start-up, connection, snapshot, manifest and exit."""
    database = pg.create_database()
    url = pg.url(database)
    try:
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(
                text("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
            )
        engine.dispose()
        ours, bare = [], []
        for _ in range(FIXED_COST_ROUNDS):
            bare.append(_time_bare_pg_dump(url, tmp_path / "bare.dump"))
            ours.append(_time_ops_backup_run(url, tmp_path / "backups"))
        print(
            f"\nsmall database, {FIXED_COST_ROUNDS} rounds alternated: bare pg_dump median "
            f"{statistics.median(bare):.3f}s, ops backup run {statistics.median(ours):.3f}s: "
            f"a CLI run adds {statistics.median(ours) - statistics.median(bare):.3f}s"
        )
    finally:
        pg.drop_database(database)


def test_backup_run_against_bare_pg_dump(pg: Server, tmp_path: Path) -> None:
    database = pg.create_database()
    url = pg.url(database)
    try:
        _load(url)
        db_size = _database_size(url)
        backups = tmp_path / "backups"
        bare, ours, inproc, start = [], [], [], []
        for round_number in range(1, ROUNDS + 1):
            # Rotate which goes first so none always gets the warmer cache.
            runs = [
                (bare, lambda: _time_bare_pg_dump(url, tmp_path / "bare.dump")),
                (ours, lambda: _time_ops_backup_run(url, backups)),
                (inproc, lambda: _time_in_process_run(url, backups)),
            ]
            shift = round_number % len(runs)
            for figures, measure in runs[shift:] + runs[:shift]:
                figures.append(measure())
            start.append(_time_cli_start(url, backups))
            print(
                f"round {round_number}: pg_dump {bare[-1]:.2f}s  ops backup run {ours[-1]:.2f}s"
                f"  in-process run {inproc[-1]:.2f}s  CLI start-up {start[-1]:.2f}s"
            )
        store = BackupDirectory(backups)
        newest = store.backups(database)[-1]
        bare_median, ours_median = statistics.median(bare), statistics.median(ours)
        inproc_median = statistics.median(inproc)
        print(
            f"database {db_size / 1e6:.0f} MB, dump {newest.size_bytes / 1e6:.0f} MB "
            f"(custom, -Z1), {ROUNDS} rounds, order rotated"
        )
        print(
            f"median: pg_dump {bare_median:.2f}s ({db_size / 1e6 / bare_median:.0f} MB/s), "
            f"ops backup run {ours_median:.2f}s ({db_size / 1e6 / ours_median:.0f} MB/s), "
            f"ratio {ours_median / bare_median:.3f}x (target <= 1.05x)"
        )
        # On a shared machine the fastest round is the least disturbed one.
        print(
            f"best of {ROUNDS}: pg_dump {min(bare):.2f}s, ops backup run {min(ours):.2f}s, "
            f"ratio {min(ours) / min(bare):.3f}x"
        )
        print(
            f"in-process run (the sidecar's scheduled backup): median {inproc_median:.2f}s "
            f"(ratio {inproc_median / bare_median:.3f}x), best {min(inproc):.2f}s "
            f"(ratio {min(inproc) / min(bare):.3f}x); CLI start-up alone "
            f"{statistics.median(start):.2f}s"
        )
        started = time.perf_counter()
        checksum_dump(store.data_path(newest))
        print(
            f"last run's manifest duration (dump, row counts, sha256) "
            f"{newest.duration_seconds:.2f}s; sha256 of the dump alone "
            f"{time.perf_counter() - started:.2f}s"
        )
        settings = settings_for(url, backups)
        connection = connect(settings)
        try:
            started = time.perf_counter()
            with connection.cursor() as cursor:
                cursor.execute(TABLES_SQL)
                tables = [(str(s), str(t)) for s, t in cursor.fetchall()]
            count_rows(connection, tables)
            print(f"row counting alone (runs beside pg_dump): {time.perf_counter() - started:.2f}s")
        finally:
            connection.close()

        target = f"{database}_restore"
        started = time.perf_counter()
        restore_backup(settings, newest.id, target, jobs=2)
        print(f"restore (ops backup restore -j 2): {time.perf_counter() - started:.1f}s")
        pg.drop_database(target)
        verification = drill(settings, newest)
        print(
            f"verify drill (checksum + restore + row counts + drop): "
            f"{verification.duration_seconds:.1f}s, {'ok' if verification.ok else 'FAILED'}: "
            f"{verification.detail}"
        )
        assert verification.ok
    finally:
        pg.drop_database(f"{database}_restore")
        pg.drop_database(database)
