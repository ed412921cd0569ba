"""Our sidecar's scrape against ``prometheus-postgres-exporter`` on the same database, same run.

A cluster of its own gets three databases of 100, 2,000 and 10,000 tables (each table with an
index and three rows, pg_stat_statements installed). Printed: p50/p95 scrape time over
alternating scrapes, series counts and RSS (MB, after the first scrape and at the end), the
ratio ours/theirs at 2,000 tables (target p50 <= 0.25x), the sidecar's RSS after start-up and a
first scrape (target <= 60 MB) and ours at 10,000 tables vs 100 tables (target <= 1.5x).
Asserts no time: the figures depend on the machine and its load.
"""

from __future__ import annotations

import gzip
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from tests.conftest import env_for
from tests.pgcluster import Cluster, free_port, wait_for

SCRAPES = int(os.environ.get("DBOPS_BENCH_SCRAPES", "20"))
OPS = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "ops")
QUERIES_DIR = Path("/usr/share/doc/prometheus-postgres-exporter/examples")
BATCH = 1000


def _postgres_exporter() -> str:
    found = shutil.which("prometheus-postgres-exporter")
    if found is None and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
             "prometheus-postgres-exporter"],
            check=False, capture_output=True, env=env, timeout=600,
        )  # fmt: skip
        # Debian starts the packaged service on install; this benchmark starts its own.
        for command in (["systemctl", "stop", "prometheus-postgres-exporter"],
                        ["service", "prometheus-postgres-exporter", "stop"]):  # fmt: skip
            subprocess.run(command, check=False, capture_output=True)
        found = shutil.which("prometheus-postgres-exporter")
    if found is None:
        pytest.skip("prometheus-postgres-exporter is not installed (apt-get install it)")
    return found


def _queries_yaml(directory: Path) -> Path:
    plain, packed = QUERIES_DIR / "queries.yaml", QUERIES_DIR / "queries.yaml.gz"
    if plain.exists():
        return plain
    if packed.exists():
        target = directory / "queries.yaml"
        target.write_bytes(gzip.decompress(packed.read_bytes()))
        return target
    pytest.skip("postgres_exporter's examples/queries.yaml not found")


def _build(cluster: Cluster, name: str, tables: int) -> URL:
    admin = create_engine(cluster.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = cluster.url(name)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    started = time.perf_counter()
    with engine.connect() as connection:
        connection.execute(text("CREATE EXTENSION pg_stat_statements"))
        for first in range(1, tables + 1, BATCH):
            last = min(tables, first + BATCH - 1)
            connection.execute(
                text(
                    f"""DO $$ BEGIN FOR i IN {first}..{last} LOOP
                    EXECUTE format('CREATE TABLE t_%s (id int NOT NULL, v text)', i);
                    EXECUTE format('CREATE INDEX t_%s_id ON t_%s (id)', i, i);
                    EXECUTE format(
                        'INSERT INTO t_%s SELECT g, md5(g::text) FROM generate_series(1, 3) g', i);
                    END LOOP; END $$"""
                )
            )
    engine.dispose()
    print(f"  built {name}: {tables} tables in {time.perf_counter() - started:.1f}s")
    return url


@dataclass
class Target:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    times: list[float] = field(default_factory=list)
    series: int = 0
    first_scrape_rss_mib: float = 0.0  # after start-up and one scrape

    def scrape(self) -> str:
        started = time.perf_counter()
        with urllib.request.urlopen(self.url, timeout=60) as response:
            body: str = response.read().decode()
        self.times.append(time.perf_counter() - started)
        return body

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.times)
        return ordered[max(0, min(len(ordered) - 1, round(fraction * len(ordered)) - 1))]


def _value(body: str, name: str) -> float | None:
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


@contextmanager
def _ours(name: str, url: URL, tmp: Path) -> Iterator[Target]:
    port = free_port()
    env = env_for(url, OPS_LISTEN=f"127.0.0.1:{port}", BACKUP_DIR=str(tmp / f"backups-{name}"))
    log = (tmp / f"{name}.log").open("wb")
    process = subprocess.Popen([OPS, "serve"], env=env, stdout=log, stderr=log)
    target = Target(name, process, f"http://127.0.0.1:{port}/metrics")
    try:

        def settled() -> bool:
            try:
                body = target.scrape()
            except OSError:
                return False
            # the cache is filled and the start-up catch-up backup has finished
            return (
                _value(body, 'dbops_collector_last_success_timestamp_seconds{collector="sizes"}')
                or 0
            ) > 0 and _value(body, "dbops_backup_in_progress") in (0, None)

        assert wait_for(settled, 600, interval=0.5), (tmp / f"{name}.log").read_text()
        target.times.clear()
        yield target
    finally:
        process.terminate()
        process.wait(30)
        log.close()


@contextmanager
def _theirs(url: URL, queries: Path, tmp: Path) -> Iterator[Target]:
    port = free_port()
    dsn = url.set(drivername="postgresql", query={"sslmode": "disable"})
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATA_SOURCE_NAME": dsn.render_as_string(hide_password=False),  # env, never argv
    }
    log = (tmp / "postgres_exporter.log").open("wb")
    process = subprocess.Popen(
        [_postgres_exporter(), f"--web.listen-address=127.0.0.1:{port}",
         f"--extend.query-path={queries}"],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip
    target = Target("postgres_exporter", process, f"http://127.0.0.1:{port}/metrics")
    try:

        def answering() -> bool:
            try:
                return "pg_up 1" in target.scrape()
            except OSError:
                return False

        assert wait_for(answering, 60, interval=0.5), (tmp / "postgres_exporter.log").read_text()
        target.times.clear()
        yield target
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _alternate(targets: list[Target]) -> None:
    for warm_up in range(2):  # not counted
        for target in targets:
            target.scrape()
            if warm_up == 0:
                target.first_scrape_rss_mib = target.rss_mib()
    for target in targets:
        target.times.clear()
    for round_number in range(SCRAPES):
        order = targets if round_number % 2 == 0 else list(reversed(targets))
        for target in order:
            body = target.scrape()
            target.series = sum(1 for line in body.splitlines() if line and line[0] != "#")


def _report(targets: list[Target]) -> None:
    print(
        f"  {'target':34s} {'p50 ms':>8s} {'p95 ms':>8s} {'series':>8s} "
        f"{'RSS MB 1st':>10s} {'RSS MB end':>10s}"
    )
    for target in targets:
        print(
            f"  {target.name:34s} {statistics.median(target.times) * 1000:8.1f} "
            f"{target.percentile(0.95) * 1000:8.1f} {target.series:8d} "
            f"{target.first_scrape_rss_mib * 1.048576:10.1f} {target.rss_mib() * 1.048576:10.1f}"
        )


def test_sidecar_scrape_vs_postgres_exporter() -> None:
    exporter = _postgres_exporter()
    assert exporter
    cluster = Cluster().start()
    try:
        with tempfile.TemporaryDirectory(prefix="dbops-bench-") as name, ExitStack() as stack:
            tmp = Path(name)
            queries = _queries_yaml(tmp)
            print()
            print(f"exporter benchmark: {SCRAPES} alternating scrapes per target")
            urls = {n: _build(cluster, f"bench_{n}", n) for n in (100, 2000, 10000)}

            ours = stack.enter_context(_ours("dbops sidecar @ 2,000 tables", urls[2000], tmp))
            theirs = stack.enter_context(_theirs(urls[2000], queries, tmp))
            _alternate([ours, theirs])
            print("2,000 tables, same database:")
            _report([ours, theirs])
            ratio = statistics.median(ours.times) / statistics.median(theirs.times)
            print(f"  ratio ours/theirs p50: {ratio:.3f}x  (target <= 0.25x)")
            print(
                f"  sidecar RSS after start-up and a first scrape: "
                f"{ours.first_scrape_rss_mib * 1.048576:.1f} MB (target <= 60 MB); "
                f"ratio to postgres_exporter's: "
                f"{ours.first_scrape_rss_mib / theirs.first_scrape_rss_mib:.2f}x"
            )
            stack.close()

            small = stack.enter_context(_ours("dbops sidecar @ 100 tables", urls[100], tmp))
            large = stack.enter_context(_ours("dbops sidecar @ 10,000 tables", urls[10000], tmp))
            _alternate([small, large])
            print("scaling with the number of tables:")
            _report([small, large])
            growth = statistics.median(large.times) / statistics.median(small.times)
            print(f"  ratio 10,000/100 tables p50: {growth:.3f}x  (target <= 1.5x)")
            stack.close()
    finally:
        cluster.stop()
