"""The host's volumes gone, the database back from the object store alone.

Runs after test_stack.py on the same stack (its last test leaves it down), with the
``objectstore`` profile the suite turns on. The objectstore keeps objects in memory, so what
test_stack.py shipped went with its container; the host's volumes are removed too, so the
stack starts as a new deployment would, against an empty store: `make up`, rows before and
after a time T while a writer keeps committing, the off-host WAL lag below
PITR_ARCHIVE_TIMEOUT, then the postgres, PITR and backup volumes destroyed. `make recover
FROM=offsite` brings back the latest point the store holds (the off-host RPO is measured
there), and `make recover FROM=offsite TIME=T` exactly the rows up to T.

Needs the sidecar's off-host shipping (Barman Cloud WAL and base backups to OFFSITE_S3_URL,
and its dbops_offsite_* metrics).
"""

from __future__ import annotations

import re
import subprocess
import threading
import time

import pytest

from tests.e2e.conftest import FIGURES, Stack, wait_until

ARCHIVE_TIMEOUT = 60.0  # PITR_ARCHIVE_TIMEOUT: the stack's default


def metric(stack: Stack, name: str) -> float | None:
    status, body = stack.get("OPS_PORT", "/metrics")
    if status != 200:
        return None
    match = re.search(rf"^{name} ([0-9.e+-]+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else None


def epoch(stack: Stack, sql: str) -> float:
    return float(stack.psql(f"SELECT extract(epoch FROM ({sql}))"))


class Writer:
    """Commits one row a second until stopped: the last commit before the host is lost."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.stack.psql("INSERT INTO offsite_tick DEFAULT VALUES")
            self.stop.wait(1.0)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def destroy_host_volumes(stack: Stack) -> None:
    """Every container but the object store's removed, then the data, PITR and backup volumes."""
    services = [s for s in stack.containers() if s != "objectstore"]
    for args in (("stop", *services), ("rm", "-f", *services)):
        result = stack.compose(*args, timeout=180)
        assert result.returncode == 0, result.stderr
    remove_volumes(stack)


def remove_volumes(stack: Stack, missing_ok: bool = False) -> None:
    for name in ("pgdata", "pitr", "backups"):
        removed = subprocess.run(
            ["docker", "volume", "rm", f"{stack.project}_{name}"], capture_output=True, text=True
        )
        gone = missing_ok and "no such volume" in removed.stderr.lower()
        assert removed.returncode == 0 or gone, removed.stderr


@pytest.mark.timeout(2400)
def test_make_recover_from_offsite_after_the_host_volumes_are_destroyed(stack: Stack) -> None:
    assert not stack.containers(), "test_stack.py leaves the stack down"
    remove_volumes(stack, missing_ok=True)  # absent when this test runs alone
    up = stack.make("up", timeout=900)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    assert "objectstore" in stack.containers()
    # The store holds a base backup and WAL after it: what a recovery from it needs.
    wait_until(
        lambda: stack.exec_ops(
            "pitr", "restore", "/tmp/offsite-probe", "--from", "offsite", "--target", "latest",
            "--dry-run",
        ).returncode == 0,
        600,
        "a base backup and WAL in the object store",
        interval=5,
    )  # fmt: skip
    stack.psql("CREATE TABLE offsite_probe (id int PRIMARY KEY)")
    stack.psql(
        "CREATE TABLE offsite_tick (id serial PRIMARY KEY, "
        "at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    stack.psql("INSERT INTO offsite_probe SELECT generate_series(1, 100)")
    target = stack.psql("SELECT clock_timestamp()")
    stack.psql("INSERT INTO offsite_probe SELECT generate_series(101, 150)")
    written = time.time()
    with Writer(stack):
        # Shipping has caught up since the rows after T: WAL shipped after they were
        # written, and the lag below one archive timeout.
        wait_until(
            lambda: (
                (shipped := metric(stack, "dbops_offsite_wal_last_shipped_timestamp_seconds"))
                and shipped > written + 1
                and (lag := metric(stack, "dbops_offsite_wal_lag_seconds")) is not None
                and lag < ARCHIVE_TIMEOUT
            ),
            6 * ARCHIVE_TIMEOUT,
            "off-host WAL lag below PITR_ARCHIVE_TIMEOUT",
        )
    last_commit = epoch(stack, "SELECT max(at) FROM offsite_tick")
    destroy_host_volumes(stack)

    started = time.monotonic()
    latest = stack.make("recover", timeout=1200, FROM="offsite")
    took_latest = time.monotonic() - started
    assert latest.returncode == 0, latest.stdout[-3000:] + latest.stderr[-3000:]
    assert stack.psql("SELECT count(*) FROM offsite_probe") == "150"
    recovered = epoch(stack, "SELECT max(at) FROM offsite_tick")
    rpo = last_commit - recovered
    FIGURES["off-host RPO: last commit before the volumes were destroyed - newest recovered"] = (
        f"{rpo:.1f} s (target <= {2 * ARCHIVE_TIMEOUT:g} s = 2 x PITR_ARCHIVE_TIMEOUT)"
    )
    FIGURES["make recover FROM=offsite (latest), host volumes gone: to all healthy"] = (
        f"{took_latest:.1f} s"
    )
    assert 0 <= rpo <= 2 * ARCHIVE_TIMEOUT, rpo

    started = time.monotonic()
    to_time = stack.make("recover", timeout=1200, FROM="offsite", TIME=target)
    took = time.monotonic() - started
    assert to_time.returncode == 0, to_time.stdout[-3000:] + to_time.stderr[-3000:]
    assert stack.psql("SELECT count(*) || ' ' || max(id) FROM offsite_probe") == "100 100"
    assert stack.psql("SELECT count(*) FROM offsite_tick") == "0"  # every tick was after T
    assert "kept in volume" in to_time.stdout  # the latest recovery's data, kept
    FIGURES["make recover FROM=offsite TIME=T: restore from the store, replay, promote"] = (
        f"{took:.1f} s"
    )
    for table in ("offsite_probe", "offsite_tick"):
        stack.psql(f"DROP TABLE {table}")  # not platform tables: ops db check would say so
    checked = stack.exec_ops("db", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
