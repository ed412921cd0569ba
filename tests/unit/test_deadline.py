"""SingleFlight: concurrent callers share one run, and each answers by its deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable

import pytest

from ops.deadline import DeadlineExceeded, SingleFlight


def test_concurrent_callers_share_one_run() -> None:
    runs = []
    release = threading.Event()

    def work(key: Hashable) -> int:
        runs.append(key)
        release.wait(5)
        return len(runs)

    flight: SingleFlight[int] = SingleFlight(work, "test")
    results: list[int] = []
    callers = [threading.Thread(target=lambda: results.append(flight.call(5))) for _ in range(20)]
    for caller in callers:
        caller.start()
    time.sleep(0.2)
    release.set()
    for caller in callers:
        caller.join(5)
    assert results == [1] * 20 and runs == [None]
    assert flight.in_flight() == 0
    assert flight.call(5) == 2  # a later call runs the work again


def test_a_stuck_run_answers_by_the_deadline_and_later_callers_do_not_wait_behind_it() -> None:
    stuck = threading.Event()
    runs = []

    def work(key: Hashable) -> str:
        runs.append(key)
        stuck.wait(30)
        return "late"

    flight: SingleFlight[str] = SingleFlight(work, "test")
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        flight.call(0.5)
    assert 0.4 < time.monotonic() - started < 1.5
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as late:
        flight.call(0.5)  # the run it would join is already overdue
    assert time.monotonic() - started < 0.1
    assert late.value.running_for >= 0.5
    assert runs == [None]  # no second run piled up behind the stuck one
    stuck.set()


def test_errors_reach_every_waiting_caller_and_do_not_stick() -> None:
    calls = []

    def work(key: Hashable) -> int:
        calls.append(key)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return 7

    flight: SingleFlight[int] = SingleFlight(work, "test")
    with pytest.raises(RuntimeError, match="boom"):
        flight.call(1)
    assert flight.call(1) == 7


def test_different_keys_run_separately() -> None:
    flight: SingleFlight[Hashable] = SingleFlight(lambda key: key, "test")
    assert flight.call(1, "a") == "a"
    assert flight.call(1, ("b", 2)) == ("b", 2)


def _get(app: object, path: str) -> tuple[str, str, float]:
    captured: dict[str, str] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        captured["status"] = status

    started = time.monotonic()
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": ""}
    body = b"".join(app(environ, start_response))  # type: ignore[operator]
    return captured["status"], body.decode(), time.monotonic() - started


def test_every_endpoint_answers_by_its_deadline_when_the_work_behind_it_hangs() -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    from ops.alerts import AlertReceiver
    from ops.http import HttpLimits, SidecarApp

    hang = threading.Event()

    class Frozen(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            hang.wait(30)
            yield GaugeMetricFamily("late", "never in time", value=1)

    def stuck_check() -> tuple[bool, dict[str, object]]:
        hang.wait(30)
        return True, {}

    registry = CollectorRegistry()
    registry.register(Frozen())
    app = SidecarApp(
        registry,
        stuck_check,
        stuck_check,
        AlertReceiver(),
        limits=HttpLimits(deadline=0.3, metrics_deadline=0.5),
    )
    try:
        status, body, took = _get(app, "/readyz")
        assert status.startswith("503") and 0.25 < took < 1.0
        assert "readiness check gave no answer within 0.3s" in body
        status, body, took = _get(app, "/healthz")
        assert status.startswith("503") and '"healthy": false' in body and took < 1.0
        status, body, took = _get(app, "/metrics")
        assert status.startswith("503") and "not collected within 0.5s" in body and took < 1.5
        status, _, took = _get(app, "/metrics")  # joins the overdue collection: at once
        assert status.startswith("503") and took < 0.1
    finally:
        hang.set()
