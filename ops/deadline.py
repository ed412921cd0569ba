"""Calls that answer by a deadline, however long the work behind them takes.

A request handler that waits on a frozen database holds an HTTP worker until the database
thaws, and a few such requests exhaust the pool. :class:`SingleFlight` runs the work on a
daemon thread of its own and lets each caller wait only until its deadline. Callers that arrive
while the work runs share its result instead of starting it again, so 150 concurrent scrapers
cost one collection, and a call stuck on a frozen server holds one thread, not one per request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class DeadlineExceeded(Exception):
    """The work did not finish by the caller's deadline (it may still be running)."""

    def __init__(self, running_for: float) -> None:
        super().__init__(f"no answer after {running_for:.1f}s")
        self.running_for = running_for


@dataclass
class _Flight(Generic[T]):
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: T | None = None
    error: BaseException | None = None


class SingleFlight(Generic[T]):
    """At most one run of ``work(key)`` per key at a time; every caller waits at most its deadline.

    A caller never waits past ``started + deadline`` of the run it joins: one that arrives while
    a run is already overdue gets :class:`DeadlineExceeded` at once instead of queueing behind it.
    """

    def __init__(self, work: Callable[[Hashable], T], name: str) -> None:
        self._work = work
        self._name = name
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight[T]] = {}

    def call(self, deadline: float, key: Hashable = None) -> T:
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                flight = _Flight()
                self._flights[key] = flight
                threading.Thread(
                    target=self._run, args=(key, flight), name=self._name, daemon=True
                ).start()
        remaining = flight.started + deadline - time.monotonic()
        if not flight.done.wait(max(0.0, remaining)):
            raise DeadlineExceeded(time.monotonic() - flight.started)
        if flight.error is not None:
            raise flight.error
        return flight.result  # type: ignore[return-value]

    def in_flight(self) -> int:
        with self._lock:
            return len(self._flights)

    def _run(self, key: Hashable, flight: _Flight[T]) -> None:
        try:
            flight.result = self._work(key)
        except BaseException as error:  # handed to every waiting caller
            flight.error = error
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
