"""Liveness and readiness decisions of the sidecar, without a database or a socket."""

from __future__ import annotations

import time

from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry

from ops.collectors.exporter import ExporterService
from ops.daemon import Daemon
from ops.settings import load_settings

SETTINGS = load_settings({"DATABASE_URL": "postgresql://u:p@127.0.0.1:1/db"})


class Component:
    name = "fake"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        self.started = self.stopped = False

    def start(self, scheduler: BackgroundScheduler) -> None:
        self.started = True

    def health_problems(self) -> list[str]:
        return self.problems

    def stop(self) -> None:
        self.stopped = True


def test_health_lists_component_problems_and_a_stopped_scheduler() -> None:
    daemon = Daemon(SETTINGS, CollectorRegistry(), components=[Component(["backup stale"])])
    healthy, detail = daemon.health()
    assert not healthy
    assert detail["problems"] == ["scheduler is not running", "backup stale"]
    daemon.readiness.stop()


def test_health_is_ok_once_the_scheduler_runs_and_components_are_fine() -> None:
    component = Component([])
    daemon = Daemon(SETTINGS, CollectorRegistry(), components=[component])
    daemon.scheduler.start()
    try:
        assert daemon.health() == (True, {"healthy": True, "problems": []})
        daemon._scheduler_beat = time.monotonic() - 600  # the scheduler stopped running jobs
        healthy, detail = daemon.health()
        assert not healthy and "scheduler ran no job" in detail["problems"][0]
    finally:
        daemon.scheduler.shutdown(wait=False)
        daemon.readiness.stop()


def test_exporter_reports_a_refresh_job_that_stopped_running() -> None:
    service = ExporterService(SETTINGS, CollectorRegistry())
    try:
        assert service.health_problems() == []
        service.exporter.last_refresh = time.monotonic() - 10_000
        assert service.health_problems()[0].startswith("exporter: refresh job has not run")
    finally:
        service.stop()


def test_request_stop_only_sets_the_flag() -> None:
    component = Component([])
    daemon = Daemon(SETTINGS, CollectorRegistry(), components=[component])
    daemon.request_stop(15)
    assert daemon._stop.is_set() and daemon._signal == "SIGTERM"
    assert not component.stopped
    daemon.readiness.stop()
