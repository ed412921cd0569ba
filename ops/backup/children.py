"""Client programs (``pg_dump``, ``pg_restore``) die with the process that started them.

A ``kill -9`` of ``ops backup run`` runs no cleanup: without this its ``pg_dump`` went on
writing into the backup directory, holding a snapshot and a server session, while the next run
treated the half-written file as a leftover. On Linux the child asks the kernel for SIGKILL when
its parent goes (``PR_SET_PDEATHSIG``), set between fork and exec.

"Parent" is the *thread* that forked: every caller here waits for its child in the thread that
started it, so the child cannot outlive that thread without the process dying too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


# Resolved once here, not in the forked child, which must do as little as possible.
_PRCTL = _load_prctl()


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child die with this process (``None`` off Linux)."""
    prctl = _PRCTL
    if prctl is None:
        return None
    parent = os.getpid()

    def arrange() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return arrange
