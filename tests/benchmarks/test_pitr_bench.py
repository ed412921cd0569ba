"""Point-in-time recovery against bare PostgreSQL tools, on one pgbench database, same run.

- Base backup: ``ops pitr backup`` (``barman backup`` through our code) against a bare
  ``pg_basebackup`` with the options Barman gives it (plain format, no compression, no slot,
  ``--wal-method=none``, ``--checkpoint=fast``). Target: at most 1.10x.
- Recovery: ``ops pitr restore --target-time T`` plus replay to T by the restored server, against
  ``cp -a`` of the same base backup and of the same WAL segments, with the same recovery
  settings (``restore_command``, target), replayed by the same bare ``postgres``. Target: 1.3x.
- WAL streaming lag under ``pgbench -c 8`` for 60 s, sampled from ``pg_stat_replication`` for
  Barman's streaming connection every 150 ms. Target: p99 at most 1 s.

Asserts no time: the figures depend on the machine and its load. Scale with
DBOPS_BENCH_PITR_SCALE (pgbench scale, default 50), DBOPS_BENCH_PITR_ROUNDS (default 3) and
DBOPS_BENCH_PITR_LAG_SECONDS (default 60).
"""

from __future__ import annotations

import ast
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from ops.backup.pgtools import libpq_env
from ops.pitr.config import STREAMING_APPLICATION_NAME
from ops.pitr.drill import force_wal_out
from ops.pitr.scratch import ScratchServer
from ops.pitr.service import make_barman
from ops.pitr.settings import SERVER_NAME
from ops.pitr.status import LAG_SECONDS_SQL
from tests.integration.pitr_helpers import (
    backup_role_url,
    execute,
    ops_json,
    pitr_env,
    pitr_settings,
    start_pitr_cluster,
)
from tests.pgcluster import Cluster

SCALE = int(os.environ.get("DBOPS_BENCH_PITR_SCALE", "50"))
ROUNDS = int(os.environ.get("DBOPS_BENCH_PITR_ROUNDS", "3"))
LAG_SECONDS = float(os.environ.get("DBOPS_BENCH_PITR_LAG_SECONDS", "60"))
LAG_SAMPLE_SECONDS = 0.15
# The server the benchmarks measure writes like a production one: the test cluster's defaults
# (fsync off, asynchronous commit) would make WAL cheaper than it is anywhere else.
DURABLE = {"fsync": "on", "synchronous_commit": "on"}
# Past pytest's default 300 s: a loaded two-core machine takes longer than the figures need.
pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]


@dataclass
class Bench:
    cluster: Cluster
    env: dict[str, str]
    backup_url: URL


def _pgbench(cluster: Cluster) -> str:
    candidate = cluster.bindir / "pgbench"
    found = str(candidate) if candidate.exists() else shutil.which("pgbench")
    if not found:
        pytest.skip("pgbench not installed")
    return found


def _run_pgbench(cluster: Cluster, *args: str, timeout: float) -> str:
    result = subprocess.run(
        [_pgbench(cluster), *args],
        env=libpq_env(cluster.url(), "dbops-bench-pgbench"),
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    cluster = start_pitr_cluster(**DURABLE)
    env: dict[str, str] | None = None
    try:
        started = time.perf_counter()
        _run_pgbench(cluster, "-i", "-s", str(SCALE), "-I", "dtGvp", "-q", timeout=1800)
        size = execute(cluster.url(), "SELECT pg_database_size(current_database())")[0][0]
        print(
            f"\nloaded pgbench scale {SCALE}: {size / 1e6:.0f} MB in "
            f"{time.perf_counter() - started:.0f}s"
        )
        url = backup_role_url(cluster)
        env = pitr_env(cluster, tmp_path_factory.mktemp("pitr-bench"), url=url)
        first = time.perf_counter()
        ops_json("pitr", "backup", env=env)  # creates the slot, starts streaming, first WAL
        print(
            "first ops pitr backup (slot, streaming, first WAL): "
            f"{time.perf_counter() - first:.1f}s"
        )
        yield Bench(cluster, env, url)
    finally:
        try:
            if env is not None:
                make_barman(pitr_settings(env)).stop_receive_wal()
        finally:
            cluster.stop()


def _settle() -> None:
    """Write out what earlier steps left dirty in the page cache before a timed step starts.
    ``pg_basebackup`` and a starting server fsync what they wrote, so the writeback of the
    step before (a gigabyte or more) would otherwise be charged to whichever step comes next.
    It does not steady the disk itself: bare ``pg_basebackup`` of 3 GB here still took 6.5 to
    13.9 s over 5 rounds with it (6.8 to 14.9 s over 3 without)."""
    os.sync()


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}s (min {min(values):.2f}, max {max(values):.2f})"


def _ratios(ours: list[float], bare: list[float], target: str) -> str:
    """The ratio of the medians, of the bests, and the median of each round's own ratio (a
    round times both sides back to back, so each of its ratios compares like with like)."""
    paired = statistics.median(o / b for o, b in zip(ours, bare, strict=True))
    return (
        f"ratio of medians {statistics.median(ours) / statistics.median(bare):.3f}x, "
        f"of bests {min(ours) / min(bare):.3f}x, median of the rounds' ratios {paired:.3f}x "
        f"(target <= {target})"
    )


def _time_bare_pg_basebackup(bench: Bench, root: Path) -> float:
    destination = root / "bare"
    command = [
        str(bench.cluster.bindir / "pg_basebackup"),
        "-v",
        "--no-password",
        f"--pgdata={destination}",
        "--no-slot",
        "--wal-method=none",
        "--checkpoint=fast",
    ]
    _settle()
    started = time.perf_counter()
    subprocess.run(
        command,
        env=libpq_env(bench.backup_url, "dbops-bench-bare"),
        check=True,
        capture_output=True,
        timeout=1800,
    )
    elapsed = time.perf_counter() - started
    shutil.rmtree(destination)
    return elapsed


def _time_ops_pitr_backup(bench: Bench) -> tuple[float, str]:
    _settle()
    started = time.perf_counter()
    result = ops_json("pitr", "backup", env=bench.env)
    return time.perf_counter() - started, str(result["backup"]["id"])


def _copy_stats(bench: Bench, backup_id: str) -> dict[str, float]:
    """Barman's own timing of a backup (``copy_stats`` in its ``backup.info``): ``copy_time``
    is its pg_basebackup, ``total_time`` the whole ``barman backup`` after start-up."""
    server = pitr_settings(bench.env).pitr.barman_home / SERVER_NAME
    info = server / "meta" / f"{backup_id}-backup.info"  # Barman 3.13 and newer
    if not info.exists():
        info = server / "base" / backup_id / "backup.info"
    for line in info.read_text().splitlines():
        if line.startswith("copy_stats="):
            stats = ast.literal_eval(line.partition("=")[2])
            return {str(k): float(v) for k, v in stats.items() if isinstance(v, int | float)}
    return {}


def test_base_backup_against_bare_pg_basebackup(bench: Bench) -> None:
    barman = make_barman(pitr_settings(bench.env))
    root = Path(tempfile.mkdtemp(prefix="dbops-bench-basebackup-"))
    bare, ours, copy, barman_total = [], [], [], []
    try:
        for round_number in range(1, ROUNDS + 1):
            backup_id = ""

            def measure_ours() -> None:
                nonlocal backup_id
                elapsed, backup_id = _time_ops_pitr_backup(bench)
                ours.append(elapsed)

            runs = [lambda: bare.append(_time_bare_pg_basebackup(bench, root)), measure_ours]
            for measure in runs if round_number % 2 else runs[::-1]:
                measure()
            copy_stats = _copy_stats(bench, backup_id)
            copy.append(float(copy_stats.get("copy_time", 0.0)))
            barman_total.append(float(copy_stats.get("total_time", 0.0)))
            print(
                f"round {round_number}: pg_basebackup {bare[-1]:.2f}s  ops pitr backup "
                f"{ours[-1]:.2f}s (Barman's pg_basebackup {copy[-1]:.2f}s, Barman's own total "
                f"{barman_total[-1]:.2f}s)"
            )
            barman.run("delete", SERVER_NAME, backup_id)  # keeps the volume bounded
        size = execute(bench.cluster.url(), "SELECT pg_database_size(current_database())")[0][0]
        print(f"database {size / 1e6:.0f} MB, {ROUNDS} rounds, order alternated")
        print(f"bare pg_basebackup: {_spread(bare)}")
        print(f"ops pitr backup:    {_spread(ours)}")
        print(_ratios(ours, bare, "1.10x"))
        print(
            f"inside ours: Barman's pg_basebackup median {statistics.median(copy):.2f}s, Barman's "
            f"backup total {statistics.median(barman_total):.2f}s, the rest (our calls and "
            f"Barman start-ups) {statistics.median(ours) - statistics.median(barman_total):.2f}s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _server_now(cluster: Cluster) -> datetime:
    value: datetime = execute(cluster.url(), "SELECT clock_timestamp()")[0][0]
    return value.astimezone(UTC)


def _recover(datadir: Path, bindir: Path) -> float:
    """Start the restored directory, wait until it replayed to its target and promoted."""
    server = ScratchServer(datadir, bindir)
    started = time.perf_counter()
    try:
        server.start(timeout=600)
        server.wait_promoted("postgres", "postgres", 600)
        return time.perf_counter() - started
    finally:
        server.stop()


def _history(cluster: Cluster, datadir: Path) -> int:
    """Rows of pgbench_history a recovered server holds (the target's proof)."""
    server = ScratchServer(datadir, cluster.bindir)
    try:
        server.start(timeout=600)
        server.wait_promoted("postgres", "postgres", 600)
        engine = server.engine("postgres", "postgres")
        try:
            with engine.connect() as connection:
                return int(
                    connection.execute(text("SELECT count(*) FROM pgbench_history")).scalar_one()
                )
        finally:
            engine.dispose()
    finally:
        server.stop()


def test_recovery_against_cp_and_bare_replay(bench: Bench) -> None:
    settings = pitr_settings(bench.env)
    barman = make_barman(settings)
    backup_id = str(ops_json("pitr", "backup", env=bench.env)["backup"]["id"])
    base = settings.pitr.barman_home / SERVER_NAME / "base" / backup_id / "data"
    # WAL to replay: half before the target, half after it.
    _run_pgbench(bench.cluster, "-c", "4", "-j", "2", "-T", "15", "-n", timeout=120)
    target = _server_now(bench.cluster)
    expected = execute(bench.cluster.url(), "SELECT count(*) FROM pgbench_history")[0][0]
    _run_pgbench(bench.cluster, "-c", "4", "-j", "2", "-T", "15", "-n", timeout=120)
    lsn = execute(bench.cluster.url(), "SELECT pg_current_wal_insert_lsn()::text")[0][0]
    force_wal_out(settings, barman, lsn)
    archive = settings.pitr.barman_home / SERVER_NAME / "wals"

    def restore_ours(root: Path) -> float:
        _settle()
        started = time.perf_counter()
        ops_json(
            "pitr",
            "restore",
            str(root / "data"),
            "--target-time",
            target.isoformat(),
            env=bench.env,
        )
        return time.perf_counter() - started

    # What the bare side copies and configures: Barman's own choice of WAL and settings.
    root = Path(tempfile.mkdtemp(prefix="dbops-bench-recover-"))
    try:
        restore_ours(root)
        wal_names = sorted(
            entry.name
            for entry in (root / "data" / "barman_wal").iterdir()
            if entry.is_file()  # not its archive_status directory
        )
        # Barman names the restored directory in restore_command: the bare side gets the same
        # command for its own directory.
        recovery_conf = (root / "data" / "postgresql.auto.conf").read_text()
        recovery_conf = recovery_conf.replace(str(root / "data"), "@DATA@")
        assert _history(bench.cluster, root / "data") == expected
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def measure_ours() -> tuple[float, float]:
        root = Path(tempfile.mkdtemp(prefix="dbops-bench-recover-"))
        try:
            restored = restore_ours(root)
            return restored + _recover(root / "data", bench.cluster.bindir), restored
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def measure_bare() -> tuple[float, float]:
        root = Path(tempfile.mkdtemp(prefix="dbops-bench-recover-bare-"))
        try:
            _settle()
            started = time.perf_counter()
            subprocess.run(["cp", "-a", str(base), str(root / "data")], check=True)
            wal_dest = root / "data" / "barman_wal"
            wal_dest.mkdir()
            sources = [
                str(archive / name[:16] / name) if len(name) == 24 else str(archive / name)
                for name in wal_names
            ]
            subprocess.run(["cp", "-a", *sources, str(wal_dest)], check=True)
            (root / "data" / "postgresql.auto.conf").write_text(
                recovery_conf.replace("@DATA@", str(root / "data"))
            )
            (root / "data" / "recovery.signal").touch()
            copied = time.perf_counter() - started
            return copied + _recover(root / "data", bench.cluster.bindir), copied
        finally:
            shutil.rmtree(root, ignore_errors=True)

    ours, bare, ours_restore = [], [], []
    for round_number in range(1, ROUNDS + 1):
        results: dict[str, tuple[float, float]] = {}
        order = [("ours", measure_ours), ("bare", measure_bare)]
        for name, measure in order if round_number % 2 else order[::-1]:
            results[name] = measure()
        (total, restored), (bare_total, copied) = results["ours"], results["bare"]
        ours.append(total)
        ours_restore.append(restored)
        bare.append(bare_total)
        print(
            f"round {round_number}: ops pitr restore + replay {total:.2f}s (restore "
            f"{restored:.2f}s)  cp -a + replay {bare_total:.2f}s (copy {copied:.2f}s)"
        )
    size = sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
    print(
        f"base backup {size / 1e6:.0f} MB, {len(wal_names)} WAL segments to the target "
        f"({len(wal_names) * 16} MB), {ROUNDS} rounds, order alternated"
    )
    print(f"cp -a + bare replay:          {_spread(bare)}")
    print(f"ops pitr restore + replay:    {_spread(ours)} (restore alone {_spread(ours_restore)})")
    print(_ratios(ours, bare, "1.3x"))


Sample = tuple[float, int, int, int, int, float, float]


def _lag_samples(url: URL, stop: threading.Event) -> list[Sample]:
    """(time, current, sent, write, flush LSN as numbers, flush_lag seconds, what
    dbops_pitr_wal_lag_seconds exports) every 150 ms."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    samples = []
    query = text(
        f"""
        SELECT extract(epoch FROM clock_timestamp())::float8,
               pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
               COALESCE(pg_wal_lsn_diff(sent_lsn, '0/0'), 0)::bigint,
               COALESCE(pg_wal_lsn_diff(write_lsn, '0/0'), 0)::bigint,
               COALESCE(pg_wal_lsn_diff(flush_lsn, '0/0'), 0)::bigint,
               COALESCE(extract(epoch FROM flush_lag), 0)::float8,
               COALESCE({LAG_SECONDS_SQL}, -1)
          FROM pg_stat_replication WHERE application_name = :app
         ORDER BY backend_start DESC LIMIT 1
        """
    )
    try:
        with engine.connect() as connection:
            while not stop.is_set():
                row = connection.execute(query, {"app": STREAMING_APPLICATION_NAME}).one_or_none()
                if row is not None:
                    samples.append(tuple(row))
                stop.wait(LAG_SAMPLE_SECONDS)
    finally:
        engine.dispose()
    return samples  # type: ignore[return-value]


def _time_lags(samples: list[Sample], column: int) -> list[float]:
    """How old the newest WAL at ``column``'s position (0 sent, 1 written, 2 flushed) is: the
    sample's time minus that of the first sample at which the server had written past it
    (so within one sampling interval of the truth)."""
    lags = []
    first = 0
    for now, _, *positions in samples:
        position = int(positions[column])
        while samples[first][1] < position:  # the sample itself has current >= position
            first += 1
        lags.append(now - samples[first][0])
    return lags


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def test_wal_streaming_lag_under_pgbench(bench: Bench) -> None:
    make_barman(pitr_settings(bench.env)).cron()  # streaming runs (the sidecar keeps it so)
    stop = threading.Event()
    samples: list[Sample] = []

    def sample() -> None:
        samples.extend(_lag_samples(bench.cluster.url(), stop))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        output = _run_pgbench(
            bench.cluster,
            "-c",
            "8",
            "-j",
            "2",
            "-T",
            str(int(LAG_SECONDS)),
            "-n",
            timeout=LAG_SECONDS + 120,
        )
    finally:
        stop.set()
        sampler.join(30)
    tps = next((line for line in output.splitlines() if line.startswith("tps")), "tps ?")
    # The receiver's --synchronous makes commits wait only if it is a synchronous standby.
    states = execute(
        bench.cluster.url(),
        "SELECT sync_state, current_setting('synchronous_standby_names') FROM pg_stat_replication"
        " WHERE application_name = :app",
        app=STREAMING_APPLICATION_NAME,
    )
    print(f"\nBarman's connection: sync_state, synchronous_standby_names = {states}")
    assert samples, "Barman's streaming connection never showed in pg_stat_replication"
    wal_mb = (samples[-1][1] - samples[0][1]) / 1e6
    print(
        f"pgbench -c 8 -j 2 -T {LAG_SECONDS:g}: {tps.strip()}, {wal_mb:.0f} MB of WAL, "
        f"{len(samples)} samples every {LAG_SAMPLE_SECONDS * 1000:.0f} ms"
    )
    flush_lag = [s[5] for s in samples]
    exported = [s[6] for s in samples if s[6] >= 0]  # -1: no reply from the receiver yet
    lag_bytes = [max(0, s[1] - s[4]) for s in samples]
    print(
        f"the server's flush_lag: p50 {_p(flush_lag, 0.5):.3f}s, "
        f"p99 {_p(flush_lag, 0.99):.3f}s, max {max(flush_lag):.3f}s"
    )
    if exported:
        print(
            f"dbops_pitr_wal_lag_seconds: p50 {_p(exported, 0.5):.3f}s, "
            f"p99 {_p(exported, 0.99):.3f}s, max {max(exported):.3f}s"
        )
    print(
        f"unflushed by Barman (current - flush LSN): p50 {_p(lag_bytes, 0.5) / 1e6:.1f} MB, "
        f"p99 {_p(lag_bytes, 0.99) / 1e6:.1f} MB"
    )
    # sent: what the server has sent down Barman's connection; written/flushed: what
    # pg_receivewal has confirmed. Barman alone starts it with neither --synchronous (it would
    # flush only as a segment completes) nor --status-interval (it would confirm every 10 s):
    # our PITR_DIR/bin/pg_receivewal adds both (ops/pitr/programs.py). Target: p99 <= 1 s.
    for name, column in (("sent", 0), ("written", 1), ("flushed", 2)):
        lags = _time_lags(samples, column)
        print(
            f"age of the newest WAL {name} (as the server knows it): p50 {_p(lags, 0.5):.2f}s, "
            f"p99 {_p(lags, 0.99):.2f}s, max {max(lags):.2f}s"
        )
