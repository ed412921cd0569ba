"""Ctrl-C and ``docker stop`` for one-shot commands: unwind like KeyboardInterrupt, and keep
the request so that it is not lost.

Python raises KeyboardInterrupt from the signal handler wherever the main thread happens to be.
Where it lands in code whose exceptions are ignored (an at-fork callback while a child starts,
a finalizer) it is lost; where it lands inside a driver call, psycopg2 turns it into a
cancelled query. So the request is also kept: a command checks :func:`stop_if_requested` as it
goes, and maps a failure that followed a request to "interrupted" (exit 130). The traceback
Python prints for the ignored one ("Exception ignored in …") is not shown: the command says
"interrupted" once, when it stops.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

_requested = threading.Event()


def _interrupt(signum: int, frame: object) -> None:
    _requested.set()
    raise KeyboardInterrupt


def interrupt_on(*signums: signal.Signals) -> threading.Event:
    """Handle ``signums`` (SIGINT, SIGTERM) by raising KeyboardInterrupt and keeping the
    request; returns the event that records it (for code that polls a cancel event)."""
    for signum in signums:
        signal.signal(signum, _interrupt)
    if not getattr(sys.unraisablehook, "keeps_interrupts_quiet", False):
        sys.unraisablehook = _quiet_about_interrupts(sys.unraisablehook)
    return _requested


def _quiet_about_interrupts(shown: Callable[[Any], object]) -> Callable[[Any], None]:
    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _requested.is_set():
            return  # kept as a request: the command stops at its next check
        shown(unraisable)

    hook.keeps_interrupts_quiet = True  # type: ignore[attr-defined]
    return hook


def requested() -> bool:
    return _requested.is_set()


def stop_if_requested() -> None:
    """Raise KeyboardInterrupt when a stop was requested (even if its first raise was lost)."""
    if _requested.is_set():
        raise KeyboardInterrupt
