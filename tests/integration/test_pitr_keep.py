"""Retention never deletes the base backup the last good drill proved: Barman's own keep
protects it, and the previous one is released when a newer backup is proven.

Recovery-window retention deletes by age, and a test cannot wait days: ``barman cron`` (which
applies retention) runs here under libfaketime (Debian's ``faketime``) with the clock days
ahead, so real Barman judges real backups as if that much time had passed with no new ones.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from prometheus_client import CollectorRegistry

from ops.pitr.config import barman_environment
from ops.pitr.drill import drill
from ops.pitr.service import PitrService
from tests.conftest import run_ops
from tests.integration.pitr_helpers import (
    execute,
    ops_json,
    pitr_env,
    pitr_settings,
)
from tests.pgcluster import Cluster


def retention_days_later(service: PitrService, days: int) -> None:
    """``barman cron`` with the clock ``days`` ahead: Barman applies its retention policy as if
    the time had passed. File times stay real (NO_FAKE_STAT), so any WAL it archives on the
    way is catalogued with its true time."""
    faketime = shutil.which("faketime")
    assert faketime is not None, "faketime missing: apt-get install faketime"
    result = subprocess.run(
        [faketime, "-f", f"+{days}d", *service.barman.command("cron")],
        env={**barman_environment(service.settings.pitr), "NO_FAKE_STAT": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def listed(env: dict[str, str]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = ops_json("pitr", "list", env=env)
    return rows


def test_retention_keeps_the_base_backup_the_last_drill_proved_and_releases_the_one_before(
    cluster: Cluster, tmp_path: Path
) -> None:
    env = pitr_env(cluster, tmp_path / "pitr", PITR_RETENTION="1d", PITR_MIN_REDUNDANCY="1")
    settings = pitr_settings(env)
    service = PitrService(settings, CollectorRegistry())
    try:
        service.barman.prepare()
        service.supervise()  # streaming, slot, and the first base backup
        execute(cluster.url(), "CREATE TABLE ledger (id int)")
        (first,) = [b.id for b in service.refresh().good_backups]

        proven = drill(settings, service.barman)
        assert proven.ok and proven.kept and proven.backup_id == first, proven
        assert service.base_backup() and service.base_backup()  # two more, never drilled
        second, third = [b.id for b in service.refresh().good_backups][1:]
        rows = listed(env)
        assert [(r["id"], r["kept"], r["proven_by_drill"]) for r in rows] == [
            (first, True, True),
            (second, False, False),
            (third, False, False),
        ]
        assert rows[0]["retention_status"] == "KEEP:FULL"
        text = run_ops("pitr", "list", env=env).stdout
        assert f"{first}" in text and "kept: proven by the last good drill" in text

        # Three days on with no new backup, a one-day window needs only the newest (third):
        # the second goes, the proven first stays.
        retention_days_later(service, days=3)
        assert [r["id"] for r in listed(env)] == [first, third]

        # A drill proves the newest; the first is released, and the next retention run deletes it.
        again = drill(settings, service.barman)
        assert again.ok and again.kept and again.backup_id == third, again
        assert [(r["id"], r["kept"]) for r in listed(env)] == [(first, False), (third, True)]
        retention_days_later(service, days=3)
        rows = listed(env)
        assert [(r["id"], r["retention_status"], r["proven_by_drill"]) for r in rows] == [
            (third, "KEEP:FULL", True)
        ]
        # the kept backup is still a recovery point: the next drill restores it again
        assert drill(settings, service.barman).ok
    finally:
        service.stop()
