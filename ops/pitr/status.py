"""What point-in-time recovery can do right now: streaming, the slot, the archive, the window.

Gathered from Barman's JSON (backups, checks), its WAL catalogue, and the server's
``pg_replication_slots`` / ``pg_stat_replication``. Each part is gathered on its own: a
server that does not answer still leaves the archive's side of the answer, and says why.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.errors import error_line
from ops.pitr.barman import BackupInfo, Barman, BarmanError
from ops.pitr.config import STREAMING_APPLICATION_NAME
from ops.pitr.settings import SERVER_NAME, PitrSettings

if TYPE_CHECKING:  # SQLAlchemy only where the server is asked: `ops pitr restore` never does
    from sqlalchemy.engine import Engine

_SLOT_SQL = """
    SELECT s.active, s.wal_status,
           pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint AS retained_bytes,
           s.restart_lsn::text AS restart_lsn
      FROM pg_replication_slots s
     WHERE s.slot_name = :slot
    """
# For a row of pg_stat_replication: how old the oldest WAL the receiver has not confirmed
# flushed can be, in seconds (what a loss of the server would lose). 0 when it has flushed all
# the server wrote; else the time since its last reply, plus the flush lag it reported then if
# WAL it had been sent was still unflushed (an upper bound; WAL not yet sent is younger than
# that reply, give or take the server's own WAL flush delay). The server's flush_lag alone is
# no answer: it changes only when a reply arrives, and as pg_receivewal reports no replay
# position the server never clears it once the receiver has caught up (it keeps showing the
# last lag measured, however old).
LAG_SECONDS_SQL = """
    CASE WHEN flush_lsn >= pg_current_wal_lsn() THEN 0
         WHEN reply_time IS NULL THEN NULL
         ELSE GREATEST(0, EXTRACT(epoch FROM clock_timestamp() - reply_time))
              + CASE WHEN flush_lsn >= sent_lsn THEN 0
                     ELSE COALESCE(EXTRACT(epoch FROM flush_lag), 0) END
    END::float8"""
_SERVER_SQL = f"""
    SELECT pg_current_wal_lsn()::text AS current_lsn,
           pg_walfile_name(pg_current_wal_lsn()) AS current_wal,
           (SELECT setting::bigint FROM pg_settings
             WHERE name = 'max_slot_wal_keep_size') AS cap_mb,
           (SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint
              FROM pg_stat_replication WHERE application_name = :app
             ORDER BY backend_start DESC LIMIT 1) AS lag_bytes,
           (SELECT {LAG_SECONDS_SQL}
              FROM pg_stat_replication WHERE application_name = :app
             ORDER BY backend_start DESC LIMIT 1) AS lag_seconds,
           (SELECT count(*) FROM pg_stat_replication WHERE application_name = :app) AS streamers
    """


@dataclass
class SlotState:
    name: str
    exists: bool
    active: bool = False
    wal_status: str | None = None  # reserved | extended | unreserved | lost
    retained_bytes: int | None = None
    restart_lsn: str | None = None


@dataclass
class PitrStatus:
    gathered_at: float
    streaming: bool = False
    slot: SlotState | None = None
    current_lsn: str | None = None
    current_wal: str | None = None  # the segment the server writes (its timeline first)
    cap_bytes: int | None = None  # the server's max_slot_wal_keep_size; None = unlimited
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    last_wal_archived: str | None = None
    last_wal_archived_at: float | None = None
    archived_wal_files: int = 0
    backups: list[BackupInfo] = field(default_factory=list)
    failed_checks: dict[str, str] = field(default_factory=dict)
    # Where the archive lost WAL (a lost slot): no recovery to a point inside one.
    gaps: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def good_backups(self) -> list[BackupInfo]:
        return [backup for backup in self.backups if backup.done]

    @property
    def window_start(self) -> float | None:
        """The earliest point one can recover to: the end of the oldest good base backup."""
        ends = [b.end_time for b in self.good_backups if b.end_time is not None]
        return min(ends) if ends else None

    @property
    def window_end(self) -> float | None:
        """The latest point the archive surely covers: when its newest WAL file was closed."""
        if self.window_start is None or self.last_wal_archived_at is None:
            return None
        return max(self.window_start, self.last_wal_archived_at)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["window_start"] = self.window_start
        data["window_end"] = self.window_end
        return data


def timeline_of(wal_name: str) -> int:
    return int(wal_name[:8], 16)


def new_timeline(status: PitrStatus) -> bool:
    """Whether the server writes a later timeline than the archive holds: it was recovered
    (or a standby promoted), so streaming must restart there and a base backup follow."""
    if not status.current_wal or not status.last_wal_archived:
        return False
    return timeline_of(status.current_wal) > timeline_of(status.last_wal_archived)


_STREAMED = re.compile(r"^([0-9A-F]{8})[0-9A-F]{16}(\.partial)?$")


def streaming_directory(settings: PitrSettings) -> Path:
    return settings.barman_home / SERVER_NAME / "streaming"


def streamed_files(settings: PitrSettings) -> list[tuple[int, Path]]:
    """Segments (and the ``.partial`` one) in receive-wal's directory, with their timeline."""
    try:
        entries = list(streaming_directory(settings).iterdir())
    except OSError:
        return []
    found = []
    for path in entries:
        match = _STREAMED.match(path.name)
        if match:
            found.append((int(match.group(1), 16), path))
    return sorted(found)


def went_back(status: PitrStatus, settings: PitrSettings) -> bool:
    """Whether the server writes an earlier timeline than streaming last received: the data
    from before a recovery was put back. receive-wal refuses to reset to a position "behind"
    what it holds, so streaming stays down until those files are set aside."""
    if not status.current_wal:
        return False
    current = timeline_of(status.current_wal)
    return any(timeline > current for timeline, _ in streamed_files(settings))


def latest_archived_timeline(settings: PitrSettings) -> int | None:
    """The timeline of the segment archived last (by when it was closed, not by name): the
    history the server wrote most recently, which a recovery to the latest point follows.
    After going back that is the earlier timeline again, not the abandoned later one."""
    wals = settings.barman_home / SERVER_NAME / "wals"
    newest: tuple[float, int] | None = None
    for catalogue in sorted(wals.glob("*xlog.db")):
        for line in _lines(catalogue):
            parts = line.split()
            if len(parts) < 3 or not re.fullmatch(r"[0-9A-F]{24}", parts[0]):
                continue
            try:
                closed = float(parts[2])
            except ValueError:
                continue
            if newest is None or closed >= newest[0]:
                newest = (closed, timeline_of(parts[0]))
    return newest[1] if newest else None


def archived_wal(settings: PitrSettings) -> tuple[int, str | None, float | None]:
    """How many WAL files Barman's catalogue holds, and the newest's name and close time."""
    wals = settings.barman_home / SERVER_NAME / "wals"
    count, newest, newest_time = 0, None, None
    for catalogue in sorted(wals.glob("*xlog.db")):
        for line in _lines(catalogue):
            parts = line.split()
            if len(parts) < 3 or len(parts[0]) < 24:
                continue
            try:
                closed = float(parts[2])
            except ValueError:
                continue
            count += 1
            if ".history" in parts[0]:
                continue
            if newest is None or parts[0][-16:] + parts[0][:8] >= newest[-16:] + newest[:8]:
                newest, newest_time = parts[0], closed
    return count, newest, newest_time


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def server_state(engine: Engine, settings: PitrSettings, status: PitrStatus) -> None:
    """Fill the slot and streaming lag from the server; on failure record why."""
    from sqlalchemy import exc, text

    try:
        with engine.connect() as connection:
            row = (
                connection.execute(text(_SLOT_SQL), {"slot": settings.slot_name}).mappings().first()
            )
            server = (
                connection.execute(text(_SERVER_SQL), {"app": STREAMING_APPLICATION_NAME})
                .mappings()
                .one()
            )
    except exc.SQLAlchemyError as error:
        status.problems.append(f"database: {error_line(error)}")
        return
    status.slot = SlotState(name=settings.slot_name, exists=row is not None)
    if row is not None:
        status.slot.active = bool(row["active"])
        status.slot.wal_status = row["wal_status"]
        status.slot.retained_bytes = row["retained_bytes"]
        status.slot.restart_lsn = row["restart_lsn"]
    status.current_lsn = server["current_lsn"]
    status.current_wal = server["current_wal"]
    cap_mb = server["cap_mb"]
    status.cap_bytes = int(cap_mb) * 1024**2 if cap_mb is not None and cap_mb >= 0 else None
    status.streaming = bool(server["streamers"]) and bool(status.slot.active)
    if server["lag_bytes"] is not None:
        status.lag_bytes = max(0, int(server["lag_bytes"]))
        if server["lag_seconds"] is not None:
            status.lag_seconds = float(server["lag_seconds"])
    elif status.slot.retained_bytes is not None:
        status.lag_bytes = max(0, int(status.slot.retained_bytes))


def gather(barman: Barman, engine: Engine | None, *, checks: bool = False) -> PitrStatus:
    """The whole picture; ``checks`` adds ``barman check`` (slower: it connects twice)."""
    status = PitrStatus(gathered_at=time.time())
    settings = barman.settings
    if engine is not None:
        server_state(engine, settings, status)
    try:
        status.backups = barman.backups()
    except BarmanError as error:
        status.problems.append(str(error))
    from ops.pitr.state import gaps

    status.gaps = gaps(settings.state_file)
    count, newest, newest_time = archived_wal(settings)
    status.archived_wal_files = count
    status.last_wal_archived, status.last_wal_archived_at = newest, newest_time
    if checks:
        try:
            status.failed_checks = {
                name: item["hint"]
                for name, item in barman.check().items()
                if item["status"] != "OK"
            }
        except BarmanError as error:
            status.problems.append(str(error))
    return status
