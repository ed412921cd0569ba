"""WAL streaming and base backups with Barman against a real PostgreSQL: the commands, the
supervision that keeps streaming alive, and the forced WAL switch."""

from __future__ import annotations

import dataclasses
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url

from ops.pitr.service import PitrService, make_barman, pitr_engine
from ops.pitr.status import PitrStatus, archived_wal, server_state
from ops.pitr.walswitch import WalSwitcher
from tests.conftest import run_ops
from tests.integration.pitr_helpers import (
    backup_role_url,
    execute,
    ops_json,
    pitr_env,
    pitr_settings,
)
from tests.pgcluster import Cluster, wait_for


@pytest.fixture(scope="module")
def env(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One Barman home for the module, with a base backup taken by the first test."""
    # As the backup role `ops db init` makes: REPLICATION and Barman's grants, no superuser.
    environment = pitr_env(cluster, tmp_path_factory.mktemp("pitr"), url=backup_role_url(cluster))
    execute(cluster.url(), "CREATE TABLE t (id int)")
    barman = make_barman(pitr_settings(environment))
    barman.prepare()
    try:
        yield environment
    finally:
        barman.stop_receive_wal()


def test_backup_then_list_status_and_check_agree(cluster: Cluster, env: dict[str, str]) -> None:
    taken = ops_json("pitr", "backup", env=env)["backup"]
    assert taken["status"] == "DONE" and taken["size_bytes"] > 1_000_000

    listed = ops_json("pitr", "list", env=env)
    assert [b["id"] for b in listed][-1] == taken["id"]

    status = ops_json("pitr", "status", env=env)
    assert status["streaming"] is True
    assert status["slot"]["exists"] and status["slot"]["wal_status"] in ("reserved", "extended")
    assert status["cap_bytes"] == 256 * 1024**2
    assert status["window_start"] == pytest.approx(taken["end_time"])

    checked = ops_json("pitr", "check", env=env)
    failed = {k: v for k, v in checked["checks"].items() if v["status"] != "OK"}
    assert checked["ok"] is True, failed


def test_password_reaches_barman_only_through_a_private_passfile(
    cluster: Cluster, env: dict[str, str]
) -> None:
    password = make_url(env["DATABASE_URL"]).password
    assert password
    directory = Path(env["PITR_DIR"])
    passfile = directory / "pgpass"
    assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
    config = (directory / "barman.conf").read_text()
    assert password not in config
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert password not in cmdline, cmdline


def receiver(pitr_dir: str) -> tuple[int, list[str]]:
    """The pid and argv of the pg_receivewal Barman runs into ``pitr_dir`` (0, []: none)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        except OSError:
            continue
        if (
            argv
            and Path(argv[0]).name == "pg_receivewal"
            and any(a.startswith(f"--directory={pitr_dir}/") for a in argv)
        ):
            return int(pid), argv
    return 0, []


def streaming_lag(service: PitrService) -> PitrStatus:
    status = PitrStatus(gathered_at=0.0)
    server_state(service.engine, service.settings.pitr, status)
    return status


def test_streaming_flushes_and_confirms_each_write_without_making_commits_wait(
    cluster: Cluster, env: dict[str, str]
) -> None:
    settings = pitr_settings(env)
    service = PitrService(settings, CollectorRegistry())
    try:
        service.barman.cron()
        assert wait_for(lambda: service.refresh().streaming, 30, 0.5)
        assert wait_for(lambda: receiver(env["PITR_DIR"])[0] != 0, 10, 0.2)
        _, argv = receiver(env["PITR_DIR"])
        # The real program (PITR_DIR/bin/pg_receivewal exec'd it), our two options, then
        # Barman's arguments unchanged.
        assert argv[0] == str(cluster.bindir / "pg_receivewal")
        assert argv[1:3] == ["--synchronous", "--status-interval=1"]
        assert "--no-loop" in argv and f"--slot={settings.pitr.slot_name}" in argv
        # Only a synchronous standby makes commits wait; the receiver is not one.
        state = execute(
            cluster.url(),
            "SELECT sync_state, current_setting('synchronous_standby_names') "
            "FROM pg_stat_replication WHERE application_name = 'dbops-barman-streaming'",
        )
        assert [tuple(row) for row in state] == [("async", "")]

        # One small commit, far from a segment's end, is flushed and confirmed within a
        # second or two (without --synchronous: only once its segment is complete).
        execute(cluster.url(), "INSERT INTO t VALUES (3)")
        written = execute(cluster.url(), "SELECT pg_current_wal_lsn()")[0][0]
        confirmed = (
            "SELECT flush_lsn >= CAST(:lsn AS pg_lsn) FROM pg_stat_replication "
            "WHERE application_name = 'dbops-barman-streaming'"
        )
        assert wait_for(lambda: execute(cluster.url(), confirmed, lsn=written)[0][0], 3, 0.05)

        # Caught up: the exported lag is 0 (the server's flush_lag would keep its last value).
        def caught_up() -> bool:
            status = streaming_lag(service)
            return status.lag_bytes == 0 and status.lag_seconds == 0.0

        assert wait_for(caught_up, 10, 0.2)
    finally:
        service.engine.dispose()


def test_wal_lag_seconds_grows_while_the_receiver_confirms_nothing(
    cluster: Cluster, env: dict[str, str]
) -> None:
    """A receiver that is connected but stuck: the lag counts from its last confirmation,
    where the server's flush_lag would keep showing the last (small) lag it measured."""
    service = PitrService(pitr_settings(env), CollectorRegistry())
    try:
        service.barman.cron()
        assert wait_for(lambda: receiver(env["PITR_DIR"])[0] != 0, 30, 0.2)
        pid, _ = receiver(env["PITR_DIR"])
        os.kill(pid, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            execute(cluster.url(), "INSERT INTO t VALUES (4)")
            time.sleep(2.5)
            status = streaming_lag(service)
            waited = time.monotonic() - stopped
            assert status.lag_bytes is not None and status.lag_bytes > 0
            assert status.lag_seconds is not None and status.lag_seconds >= waited - 0.5
        finally:
            os.kill(pid, signal.SIGCONT)

        def caught_up() -> bool:
            status = streaming_lag(service)
            return status.lag_bytes == 0 and status.lag_seconds == 0.0

        assert wait_for(caught_up, 10, 0.2)
    finally:
        service.engine.dispose()


def test_wal_switch_happens_only_after_something_was_written(
    cluster: Cluster, env: dict[str, str]
) -> None:
    settings = pitr_settings(env)
    engine = pitr_engine(settings)
    try:
        switcher = WalSwitcher(engine)
        # Settle: the first tick may close a segment, and a switch can be followed by one
        # standby-snapshot record from the background writer.
        for _ in range(4):
            if not switcher.tick():
                break
        assert switcher.tick() is False
        execute(cluster.url(), "INSERT INTO t VALUES (1)")
        assert switcher.tick() is True
    finally:
        engine.dispose()


def test_a_commit_reaches_the_archive_within_one_switch(
    cluster: Cluster, env: dict[str, str]
) -> None:
    settings = pitr_settings(env)
    service = PitrService(settings, CollectorRegistry())
    try:
        service.barman.cron()  # streaming runs (it does already after the tests above)
        assert wait_for(lambda: service.refresh().streaming, 30, 0.5)
        before, newest_before, _ = archived_wal(settings.pitr)
        execute(cluster.url(), "INSERT INTO t VALUES (2)")
        service.switch_wal()  # switch, and archive the segment once streaming delivered it
        count, newest, _ = archived_wal(settings.pitr)
        assert newest != newest_before and count > before
    finally:
        service.engine.dispose()


def test_supervision_restarts_streaming_and_recreates_a_dropped_slot(
    cluster: Cluster, env: dict[str, str]
) -> None:
    settings = pitr_settings(env)
    settings = dataclasses.replace(
        settings, pitr=dataclasses.replace(settings.pitr, streaming_down_limit=0.0)
    )
    service = PitrService(settings, CollectorRegistry())
    try:
        service.barman.stop_receive_wal()
        assert wait_for(lambda: not service.refresh().streaming, 20, 0.5)
        execute(cluster.url(), f"SELECT pg_drop_replication_slot('{settings.pitr.slot_name}')")
        assert service.health_problems()[0].startswith("pitr: WAL streaming down for")

        service.supervise()
        assert wait_for(lambda: service.refresh().streaming, 30, 0.5)
        assert service.snapshot is not None and service.snapshot.slot is not None
        assert service.snapshot.slot.exists
        assert service.health_problems() == []
    finally:
        service.engine.dispose()


def test_pitr_commands_refuse_to_run_when_pitr_is_off(env: dict[str, str]) -> None:
    result = run_ops("pitr", "status", env={**env, "PITR_ENABLED": "false"})
    assert result.returncode == 2
    assert result.stderr.strip() == "point-in-time recovery is off: set PITR_ENABLED=true"
