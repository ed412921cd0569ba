"""An exclusive ``flock`` on a file in the backup directory.

A CLI ``ops backup run`` and the sidecar's scheduled run exclude each other through it, even
across containers that share the volume. The kernel drops the lock when the holder dies, so a
killed run never leaves the directory locked; the holder's description written into the file is
only there to tell the loser who it lost to.

Lock files are opened with ``O_NOFOLLOW`` and must be regular files: a lock file planted as a
symbolic link to something else would otherwise have us truncate that. One with other hard
links (planted, or a hard-link snapshot of the directory) still locks, but its content is
neither written nor shown.

Readers of a backup (restore, verification) hold a shared lock on that backup's own lock file
(:func:`reading`); retention takes it exclusively without waiting, and keeps the backup for now
when it cannot (:func:`claim_for_deletion`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

from ops.backup.manifest import ID_PATTERN, BackupDirectory, UnsafeEntry, dir_error, utc_now

log = logging.getLogger(__name__)

RUN_LOCK = ".dbops-backup.lock"  # backup runs and prunes
MANIFEST_LOCK = ".dbops-manifest.lock"  # short: rewriting or deleting one manifest
MANIFEST_LOCK_WAIT = 60.0
READ_LOCK_PREFIX, READ_LOCK_SUFFIX = ".dbops-read-", ".lock"  # one per backup id
READ_LOCK_WAIT = 30.0  # a reader waits this long for a prune that holds the backup
_LOCK_FLAGS = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def open_lock_file(path: Path, *, writable: bool = True) -> int:
    """An fd on the lock file ``path``, created if missing, never through a link."""
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | _LOCK_FLAGS, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeEntry(path, "is a symbolic link; refusing to use it as a lock") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeEntry(path, "is not a regular file; refusing to use it as a lock")
    return fd


def _ours_alone(fd: int) -> bool:
    """No other name points at this file: writing the holder record cannot reach elsewhere."""
    return os.fstat(fd).st_nlink == 1


def manifest_lock(directory: Path, purpose: str) -> DirectoryLock:
    return DirectoryLock(directory, MANIFEST_LOCK, purpose, wait=MANIFEST_LOCK_WAIT)


class LockHeld(Exception):
    """Someone else holds the lock; ``holder`` says who, as far as the lock file tells."""

    def __init__(self, path: Path, holder: str, message: str | None = None) -> None:
        super().__init__(message or f"backup directory is locked by {holder} ({path})")
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
        fd = open_lock_file(self.path)
        if not _flock_within(fd, fcntl.LOCK_EX, timeout):
            holder = _describe_holder(fd) if _ours_alone(fd) else "another process"
            os.close(fd)
            raise LockHeld(self.path, holder)
        self._fd = fd
        if not _ours_alone(fd):
            return
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
            if _ours_alone(fd):
                os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int:
        """The locked descriptor: a child handed it (``pass_fds``) keeps the lock held until
        the child is gone too, even if this process dies first."""
        if self._fd is None:
            raise ValueError("lock not held")
        return self._fd

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


def _flock_within(fd: int, operation: int, timeout: float) -> bool:
    """Take ``operation`` (``LOCK_EX`` or ``LOCK_SH``) on ``fd``, trying again until ``timeout``
    seconds have passed; whether it was taken."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _describe_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict) or "pid" not in data:
        return "another process"
    purpose = f" ({data['purpose']})" if data.get("purpose") else ""
    return f"pid {data['pid']} on {data.get('host', '?')}{purpose} since {data.get('since', '?')}"


def read_lock_path(store: BackupDirectory, backup_id: str) -> Path:
    if not ID_PATTERN.match(backup_id):
        raise ValueError(f"not a backup id: {backup_id!r}")
    return store.root / f"{READ_LOCK_PREFIX}{backup_id}{READ_LOCK_SUFFIX}"


@contextlib.contextmanager
def reading(store: BackupDirectory, backup_id: str, wait: float = READ_LOCK_WAIT) -> Iterator[bool]:
    """Hold a shared lock on ``backup_id`` while reading its dump; retention will not delete
    it meanwhile. Yields whether the lock is held: on a read-only directory nothing can delete
    the backup either, so the read goes ahead unprotected (a debug line says so).

    :class:`LockHeld` when a prune holds the backup for longer than ``wait``;
    :class:`ops.backup.manifest.BackupDirError` when the directory is unusable. The caller
    must check the backup still exists once the lock is held (a prune may have just won).
    """
    path = read_lock_path(store, backup_id)
    fd = _open_read_lock(store, path)
    if fd is None:
        yield False
        return
    try:
        if not _flock_within(fd, fcntl.LOCK_SH, wait):
            message = f"backup {backup_id} is being deleted by retention"
            raise LockHeld(path, "a prune", message)
        yield True
    finally:
        os.close(fd)


def _open_read_lock(store: BackupDirectory, path: Path) -> int | None:
    try:
        return open_lock_file(path, writable=False)
    except UnsafeEntry:
        raise
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES):
            log.debug("reading %s without a read lock: %s", path.name, exc.strerror)
            return None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise dir_error(store.root, exc) from None
        raise


@contextlib.contextmanager
def claim_for_deletion(store: BackupDirectory, backup_id: str) -> Iterator[None]:
    """The backup's lock, exclusively and without waiting: :class:`LockHeld` while anyone
    reads it. The lock file goes with the backup, unlinked while still held."""
    path = read_lock_path(store, backup_id)
    fd = open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = f"backup {backup_id} is being read (a restore or a verification)"
            raise LockHeld(path, "a reader", message) from None
        yield
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    finally:
        os.close(fd)


def remove_stale_read_locks(store: BackupDirectory, live_ids: Iterable[str]) -> list[str]:
    """Read-lock files of backups that no longer exist, unless someone holds them."""
    live = set(live_ids)
    removed = []
    for path in store.root.iterdir():
        name = path.name
        if not (name.startswith(READ_LOCK_PREFIX) and name.endswith(READ_LOCK_SUFFIX)):
            continue
        backup_id = name[len(READ_LOCK_PREFIX) : -len(READ_LOCK_SUFFIX)]
        if backup_id in live or not ID_PATTERN.match(backup_id):
            continue
        try:
            with claim_for_deletion(store, backup_id):
                removed.append(name)
        except (LockHeld, OSError):
            continue  # in use, or not a plain file: left alone
    return removed
