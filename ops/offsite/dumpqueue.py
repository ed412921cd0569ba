"""The queue of verified dumps waiting to be copied off host, kept on the sidecar's volume.

One small JSON file in ``OFFSITE_DIR`` says which backups wait (oldest first), which have been
shipped and when, and how long to wait after the last failure. It is written like a manifest
(temporary name, fsync, rename), so a crash leaves the old queue or the new one. A pending entry
leaves the queue only when its copy is in the store, or when the local backup it names is gone
or no longer verified (logged as an error: nothing can ship what is not there).

The file is data on a volume: one that cannot be read as our queue is moved aside (never
deleted) and the queue starts again from the backup directory, which the catch-up scan reads;
shipping a backup twice is harmless, losing one is not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

QUEUE_FILE = "dumps-queue.json"
LOCK_FILE = ".dumps-queue.lock"
QUEUE_VERSION = 1
QUEUE_MAX_BYTES = 16 << 20
BACKOFF_FIRST = 30.0  # seconds after the first failure
BACKOFF_MAX = 3600.0  # never longer than this between attempts
_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")  # ops.backup.manifest.ID_PATTERN
_DATABASE_MAX = 200
_thread_lock = threading.Lock()


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failures: 30 s, doubling, at most 1 h."""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_MAX, BACKOFF_FIRST * float(1 << min(failures - 1, 20)))


@dataclass
class Pending:
    id: str
    database: str
    bytes: int
    queued_at: float
    started: float | None = None  # the backup's start (epoch seconds); None in older queues

    def order(self) -> tuple[str, float, str]:
        """Taken first, shipped first. The id names the second the backup started in, and
        two backups can start in the same second: its random tail would then decide."""
        return self.id[:16], self.started or 0.0, self.id


@dataclass
class QueueState:
    pending: list[Pending] = field(default_factory=list)
    shipped: dict[str, float] = field(default_factory=dict)  # backup id -> when it was shipped
    failures: int = 0  # consecutive failed attempts
    next_attempt: float | None = None  # no attempt before this (backoff)
    last_error: str | None = None
    last_shipped: float | None = None

    def waiting(self, backup_id: str) -> bool:
        return any(p.id == backup_id for p in self.pending)

    def add(
        self, backup_id: str, database: str, size: int, now: float, started: float | None = None
    ) -> bool:
        """Queue a backup unless it is queued or shipped already; the queue stays in the order
        the backups were taken in (:meth:`Pending.order`)."""
        if backup_id in self.shipped or self.waiting(backup_id):
            return False
        self.pending.append(Pending(backup_id, database, size, now, started))
        self.pending.sort(key=Pending.order)
        return True

    def remove(self, backup_id: str) -> None:
        self.pending = [p for p in self.pending if p.id != backup_id]

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": QUEUE_VERSION,
                "pending": [vars(p) for p in self.pending],
                "shipped": self.shipped,
                "failures": self.failures,
                "next_attempt": self.next_attempt,
                "last_error": self.last_error,
                "last_shipped": self.last_shipped,
            },
            indent=1,
            sort_keys=True,
        )


class QueueInvalid(ValueError):
    pass


def parse_state(content: bytes) -> QueueState:
    """The queue from its file's bytes; :class:`QueueInvalid` says what is wrong."""
    try:
        data = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise QueueInvalid(f"not a JSON queue ({str(exc)[:80]})") from None
    if not isinstance(data, dict) or data.get("version") != QUEUE_VERSION:
        raise QueueInvalid(f"not a version {QUEUE_VERSION} queue")
    state = QueueState()
    pending = data.get("pending")
    if not isinstance(pending, list):
        raise QueueInvalid("pending: must be a list")
    for position, entry in enumerate(pending, 1):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("id"), str)
            and _ID.match(entry["id"])
            and isinstance(entry.get("database"), str)
            and 0 < len(entry["database"]) <= _DATABASE_MAX
            and _count(entry.get("bytes"))
            and _moment(entry.get("queued_at"))
            and (entry.get("started") is None or _moment(entry["started"]))
        ):
            raise QueueInvalid(f"pending entry {position}: not a queued backup")
        state.add(
            entry["id"],
            entry["database"],
            entry["bytes"],
            float(entry["queued_at"]),
            _float_or_none(entry.get("started")),
        )
    shipped = data.get("shipped")
    if not isinstance(shipped, dict) or not all(
        isinstance(k, str) and _ID.match(k) and _moment(v) for k, v in shipped.items()
    ):
        raise QueueInvalid("shipped: must map backup ids to times")
    state.shipped = {k: float(v) for k, v in shipped.items()}
    if not _count(data.get("failures")):
        raise QueueInvalid("failures: must be an integer >= 0")
    state.failures = data["failures"]
    for key in ("next_attempt", "last_shipped"):
        if data.get(key) is not None and not _moment(data[key]):
            raise QueueInvalid(f"{key}: must be a time or null")
    state.next_attempt = _float_or_none(data.get("next_attempt"))
    state.last_shipped = _float_or_none(data.get("last_shipped"))
    error = data.get("last_error")
    state.last_error = error[:500] if isinstance(error, str) else None
    return state


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _moment(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e11


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


class DumpQueue:
    """The queue file in ``directory``; :meth:`update` is the only way to change it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / QUEUE_FILE

    def read(self) -> QueueState:
        """The queue as it is on disk (empty if there is none yet); never raises for a bad
        file, which :meth:`update` moves aside."""
        try:
            return parse_state(_read_capped(self.path))
        except FileNotFoundError:
            return QueueState()
        except (OSError, QueueInvalid) as problem:
            log.debug("%s: %s", self.path, problem)
            return QueueState()

    @contextlib.contextmanager
    def update(self) -> Iterator[QueueState]:
        """The queue, locked against every other writer (threads and processes), written back
        atomically when the block ends without an exception."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _thread_lock:
            fd = os.open(
                self.directory / LOCK_FILE,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                state = self._load_or_set_aside()
                yield state
                self._write(state)
            finally:
                os.close(fd)

    def _load_or_set_aside(self) -> QueueState:
        try:
            return parse_state(_read_capped(self.path))
        except FileNotFoundError:
            return QueueState()
        except (OSError, QueueInvalid) as problem:
            aside = self.path.with_name(f"{QUEUE_FILE}.invalid-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error(
                "%s: %s; kept as %s, the queue is rebuilt from the verified backups",
                self.path,
                problem,
                aside.name,
            )
            return QueueState()

    def _write(self, state: QueueState) -> None:
        temp = self.directory / f".{QUEUE_FILE}.{secrets.token_hex(4)}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with open(fd, "w", encoding="utf-8") as handle:
                handle.write(state.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _read_capped(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link; not followed") from None
        raise
    with open(fd, "rb", buffering=0) as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise QueueInvalid("not a regular file")
        data = handle.read(QUEUE_MAX_BYTES + 1)
    if len(data) > QUEUE_MAX_BYTES:
        raise QueueInvalid(f"larger than {QUEUE_MAX_BYTES} bytes")
    return data


def queued_ids(directory: Path) -> set[str]:
    """Ids waiting to be shipped, for local retention (which must not delete them first)."""
    return {p.id for p in DumpQueue(directory).read().pending}
