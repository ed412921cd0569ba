"""An exclusive ``flock`` on a file in the backup directory.

A CLI ``ops backup run`` and the sidecar's scheduled run exclude each other through it, even
across containers that share the volume. The kernel drops the lock when the holder dies, so a
killed run never leaves the directory locked; the holder's description written into the file is
only there to tell the loser who it lost to.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from ops.backup.manifest import utc_now

RUN_LOCK = ".dbops-backup.lock"  # backup runs and prunes
MANIFEST_LOCK = ".dbops-manifest.lock"  # short: rewriting or deleting one manifest
MANIFEST_LOCK_WAIT = 60.0


def manifest_lock(directory: Path, purpose: str) -> DirectoryLock:
    return DirectoryLock(directory, MANIFEST_LOCK, purpose, wait=MANIFEST_LOCK_WAIT)


class LockHeld(Exception):
    """Someone else holds the lock; ``holder`` says who, as far as the lock file tells."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"backup directory is locked by {holder} ({path})")
        self.path = path
        self.holder = holder


class DirectoryLock:
    def __init__(
        self, directory: Path, name: str = RUN_LOCK, purpose: str = "", wait: float = 0.0
    ) -> None:
        self.path = directory / name
        self.wait = wait  # how long ``with`` waits for the lock
        self.purpose = purpose or " ".join(Path(a).name for a in sys.argv[:3])
        self._fd: int | None = None

    def acquire(self, timeout: float | None = None) -> None:
        """Take the lock, waiting up to ``timeout`` seconds; :class:`LockHeld` otherwise."""
        timeout = self.wait if timeout is None else timeout
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _describe_holder(fd)
                    os.close(fd)
                    raise LockHeld(self.path, holder) from None
                time.sleep(0.05)
        self._fd = fd
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": self.purpose,
            "since": utc_now().isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError:  # a full disk must not leave us holding a lock we think we lack
            pass

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict) or "pid" not in data:
        return "another process"
    purpose = f" ({data['purpose']})" if data.get("purpose") else ""
    return f"pid {data['pid']} on {data.get('host', '?')}{purpose} since {data.get('since', '?')}"
