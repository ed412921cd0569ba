"""Give memory a finished job freed back to the system.

A backup run of a database with thousands of tables builds and drops large Python structures
(row counts, catalog rows). Python frees them into the C allocator, which keeps the pages: the
sidecar, which runs for months, would carry the peak of its largest job as resident memory.
``malloc_trim`` (glibc) returns the free pages; elsewhere this only collects garbage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    gc.collect()
    if _TRIM is not None:
        try:
            _TRIM(0)
        except Exception as exc:  # never fail the job that called it
            log.debug("malloc_trim failed: %s", exc)
