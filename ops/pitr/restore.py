"""Restore a base backup plus WAL into a directory, up to a time, an LSN or the latest point.

Everything that can refuse is decided before anything is written: the target is parsed,
checked against the recovery window, a base backup is chosen, and the destination must be
empty (or, with ``replace``, its contents are moved aside to a sibling directory that the
result names, never deleted). Only then does ``barman recover`` run.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from ops.pitr.barman import BackupInfo, Barman, BarmanError, receive_wal_lock
from ops.pitr.settings import SERVER_NAME
from ops.pitr.status import PitrStatus, latest_archived_timeline

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
WAL_SEGMENT_BYTES = 16 * 1024**2  # PostgreSQL's default; Barman's catalogue assumes it too


class RestoreRefused(Exception):
    """The restore cannot be done as asked; nothing was changed. The message says why."""


@dataclass(frozen=True)
class Target:
    kind: str  # time | lsn | latest
    time: datetime | None = None
    lsn: int | None = None
    text: str = "latest"

    def describe(self) -> str:
        return "the latest point" if self.kind == "latest" else f"{self.kind} {self.text}"


def parse_lsn(text: str) -> int:
    match = _LSN.match(text.strip())
    if not match:
        raise ValueError(f"not an LSN (like 0/3000060): {text!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def parse_target(time_text: str | None, lsn_text: str | None, latest: bool) -> Target:
    """Exactly one of the three; a time must say its time zone (an operator's local time and
    the server's differ more often than not)."""
    given = [x for x in (time_text, lsn_text) if x is not None] + (["latest"] if latest else [])
    if len(given) != 1:
        raise ValueError("give exactly one of --target-time, --target-lsn, --target latest")
    if time_text is not None:
        try:
            moment = datetime.fromisoformat(time_text.strip())
        except ValueError:
            raise ValueError(f"not a time (like '2026-11-28 14:05:00+00'): {time_text!r}") from None
        if moment.tzinfo is None:
            raise ValueError(f"give a time zone, e.g. '{time_text.strip()}+00'")
        return Target("time", time=moment.astimezone(UTC), text=moment.isoformat())
    if lsn_text is not None:
        return Target("lsn", lsn=parse_lsn(lsn_text), text=lsn_text.strip().upper())
    return Target("latest")


def segment_end_lsn(wal_name: str) -> int:
    """The LSN just past the end of WAL segment ``wal_name`` (TTTTTTTTLLLLLLLLSSSSSSSS)."""
    log, segment = int(wal_name[8:16], 16), int(wal_name[16:24], 16)
    return (log << 32) + (segment + 1) * WAL_SEGMENT_BYTES


def choose_backup(status: PitrStatus, target: Target) -> BackupInfo:
    """The newest good base backup that ends at or before the target, if the archive
    reaches the target; otherwise :class:`RestoreRefused` with the window in the message."""
    good = [b for b in status.good_backups if b.end_time is not None]
    if not good:
        raise RestoreRefused("no base backup to restore from (take one: ops pitr backup)")
    window = _window_text(status)
    if target.kind == "latest":
        return good[-1]
    if target.kind == "time":
        assert target.time is not None
        moment = target.time.timestamp()
        usable = [b for b in good if b.end_time is not None and b.end_time <= moment]
        end = status.window_end
        if not usable:
            raise RestoreRefused(f"{target.describe()} is before the recovery window ({window})")
        if end is None or moment > end:
            raise RestoreRefused(f"{target.describe()} is past the recovery window ({window})")
        return usable[-1]
    assert target.lsn is not None
    usable = [b for b in good if b.end_lsn is not None and parse_lsn(b.end_lsn) <= target.lsn]
    if not usable:
        raise RestoreRefused(f"{target.describe()} is before the end of the oldest base backup")
    if status.last_wal_archived is None or target.lsn > segment_end_lsn(status.last_wal_archived):
        raise RestoreRefused(
            f"{target.describe()} is past the archive, which ends with "
            f"{status.last_wal_archived or 'no WAL'}"
        )
    return usable[-1]


def with_end_lsns(barman: Barman, status: PitrStatus, target: Target) -> PitrStatus:
    """``status`` whose good backups carry their end LSN, as far as an LSN target needs.

    ``list-backups`` gives no LSNs; ``show-backup`` does, one Barman start-up per backup. So
    the newest are shown first and the search stops at the first that ends at or before the
    target: the older ones cannot be chosen. Other targets need no LSN: ``status`` as it is.
    """
    if target.kind != "lsn" or target.lsn is None:
        return status
    shown: dict[str, BackupInfo] = {}
    for backup in reversed(status.good_backups):
        full = barman.show(backup.id)
        shown[backup.id] = full
        if full.end_lsn is not None and parse_lsn(full.end_lsn) <= target.lsn:
            break
    return replace(status, backups=[shown.get(b.id, b) for b in status.backups])


def _window_text(status: PitrStatus) -> str:
    def when(value: float | None) -> str:
        if value is None:
            return "-"
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S+00")

    return f"{when(status.window_start)} .. {when(status.window_end)}"


def prepare_destination(destination: Path, *, replace: bool) -> Path | None:
    """Make sure ``destination`` may receive a restore; with ``replace`` move what it holds to
    a sibling directory and return it. A directory a running server uses is never touched."""
    if destination.is_symlink():
        raise RestoreRefused(f"{destination} is a symlink; give the real directory")
    if destination.exists() and not destination.is_dir():
        raise RestoreRefused(f"{destination} is not a directory")
    entries = sorted(os.listdir(destination)) if destination.exists() else []
    if not entries:
        return None
    pid_file = destination / "postmaster.pid"
    if pid_file.exists() and _server_alive(pid_file):
        raise RestoreRefused(f"a PostgreSQL server is running on {destination}: stop it first")
    if not replace:
        raise RestoreRefused(
            f"{destination} is not empty; restore elsewhere, or add --replace to move what it "
            "holds aside (it is kept, never deleted)"
        )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    kept = destination.with_name(f"{destination.name}.before-recover-{stamp}")
    kept.mkdir(mode=0o700)
    try:
        for name in entries:
            os.rename(destination / name, kept / name)
    except OSError as error:
        for name in os.listdir(kept):  # put back what was moved; nothing may be lost
            os.rename(kept / name, destination / name)
        kept.rmdir()
        raise RestoreRefused(
            f"cannot move {destination}'s contents aside: {error.strerror}"
        ) from None
    return kept


def _server_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RestoreResult:
    backup_id: str
    target: str
    destination: str
    kept: str | None
    seconds: float


def restore(
    barman: Barman,
    status: PitrStatus,
    target: Target,
    destination: Path,
    *,
    replace: bool = False,
    timeout: float = 6 * 3600,
) -> RestoreResult:
    """Restore into ``destination`` with recovery settings for ``target`` (the server promotes
    when it gets there). Raises :class:`RestoreRefused` before changing anything."""
    backup = choose_backup(with_end_lsns(barman, status, target), target)
    destination = destination.absolute()
    kept = prepare_destination(destination, replace=replace)
    destination.mkdir(parents=True, exist_ok=True, mode=0o700)
    args = ["recover", SERVER_NAME, backup.id, str(destination)]
    if target.kind == "time":
        assert target.time is not None
        args += ["--target-time", target.time.isoformat(), "--target-action", "promote"]
    elif target.kind == "lsn":
        assert target.lsn is not None
        args += ["--target-lsn", format_lsn(target.lsn), "--target-action", "promote"]
    else:
        # Without any target Barman writes no recovery settings and puts the WAL in pg_wal: the
        # server would crash-recover and go on writing the archive's own timeline, giving a
        # second history under the names of segments already archived. A timeline target
        # makes it an archive recovery that replays every archived segment, then promotes
        # onto a new timeline, like a recovery to a time. It follows the timeline archived
        # last: after going back to the data from before a recovery that is the earlier one,
        # which PostgreSQL's "latest" (the highest number in the archive) would not be.
        timeline = latest_archived_timeline(barman.settings)
        args += ["--target-tli", str(timeline) if timeline else "latest"]
    started = time.monotonic()
    try:
        # Only "latest" reads the segment being streamed: a recovery to a time or an LSN leaves
        # the receiver's lock alone, so streaming can restart while it copies.
        latest = target.kind == "latest"
        receiver = receive_wal_lock(barman.settings) if latest else contextlib.nullcontext(False)
        with receiver as no_receiver:
            if no_receiver:
                # The segment being streamed when the server stopped (``.partial``, flushed
                # within a second of the server writing it) is part of "latest": after a crash
                # it holds the commits since the last WAL switch. Barman takes it only when it
                # follows the last archived segment on the target timeline.
                args.append("--partial-wal")
            barman.run(*args, timeout=timeout)
    except BarmanError as error:
        where = f"; what {destination} held is in {kept}" if kept else ""
        raise BarmanError(f"{error}{where}") from None
    return RestoreResult(
        backup_id=backup.id,
        target=target.describe(),
        destination=str(destination),
        kept=str(kept) if kept else None,
        seconds=time.monotonic() - started,
    )
