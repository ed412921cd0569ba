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
