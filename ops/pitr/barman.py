"""Barman as a command-line tool: configure it, run one command, read its JSON.

We drive Barman, we do not reimplement it. Every call goes through :meth:`Barman.run`, which
gives Barman its generated configuration and passfile, bounds the call in time and turns a
failure into one line (Barman's own error, never a traceback or a password).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pwd
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.pgurl import PgUrl
from ops.pitr.config import barman_config, barman_environment, passfile_text, write_private
from ops.pitr.programs import ProgramsError, write_programs
from ops.pitr.settings import RECEIVE_WAL_LOCK, SERVER_NAME, PitrSettings

if TYPE_CHECKING:
    from ops.settings import Settings

DEFAULT_TIMEOUT = 120.0


class BarmanError(Exception):
    """A Barman command failed; the message is the one line worth showing."""


@dataclass(frozen=True)
class BackupInfo:
    """One base backup, as ``barman list-backups`` and ``show-backup`` describe it."""

    id: str
    status: str
    begin_time: float | None
    end_time: float | None
    size_bytes: int
    wal_size_bytes: int
    begin_wal: str | None = None
    end_wal: str | None = None
    begin_lsn: str | None = None
    end_lsn: str | None = None
    timeline: int | None = None
    retention_status: str | None = None

    @property
    def done(self) -> bool:
        return self.status == "DONE"


def _first_line(text: str) -> str:
    """Barman's error line: the first ERROR/EXCEPTION, else the first line that is not a
    warning (Barman warns, for one, about configuration files outside the data directory)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("ERROR: ", "EXCEPTION: ")):
            return line.split(": ", 1)[1]
    for line in lines:
        if not line.startswith(("WARNING", "See log file", "\t")):
            return line
    return lines[0] if lines else "no output"


def _error_of(stdout: str, stderr: str) -> str:
    """Barman reports errors on stderr, or as ``_ERROR``/``_EXCEPTION`` keys in JSON."""
    try:
        data = json.loads(stdout)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("_EXCEPTION", "_ERROR"):
            messages = data.get(key)
            if isinstance(messages, list) and messages:
                return _first_line(str(messages[0]))
    return _first_line(stderr or stdout)


def _try_receive_wal_lock(settings: PitrSettings) -> tuple[int | None, bool]:
    """Try Barman's receive-wal lock: (a descriptor holding it, or None; whether a receiver
    holds it). A planted link or FIFO is neither followed nor taken for a free lock."""
    from ops.backup.lock import open_lock_file

    try:
        descriptor = open_lock_file(settings.barman_home / RECEIVE_WAL_LOCK)
    except OSError:
        return None, False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        return None, error.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    return descriptor, False


@contextlib.contextmanager
def receive_wal_lock(settings: PitrSettings) -> Iterator[bool]:
    """Take Barman's receive-wal lock when no receiver holds it (yields True) and hold it for
    the block: meanwhile no ``receive-wal`` starts, so nothing writes the ``.partial``
    segment. Yields False when a receiver holds it or the lock is unusable. A running
    receiver can complete the segment under a copy (it renames it), so a restore leaves its
    ``.partial`` out then: the live server still has that WAL, and ``ops pitr switch-wal``
    before the restore archives it."""
    descriptor, _ = _try_receive_wal_lock(settings)
    try:
        yield descriptor is not None
    finally:
        if descriptor is not None:
            os.close(descriptor)  # releases the lock


_BACKUP_ID = re.compile(r"^[0-9]{8}T[0-9]{6}$")  # how Barman names a backup


class Barman:
    """One configured Barman server (``dbops``) and the commands the sidecar needs."""

    def __init__(
        self,
        settings: PitrSettings,
        url: PgUrl,
        *,
        bindir: Path | None = None,
        connect_timeout: int = 10,
    ) -> None:
        self.settings = settings
        self.url = url
        self.bindir = bindir
        self.connect_timeout = connect_timeout

    def prepare(self) -> None:
        """Create Barman's directories and (re)write its configuration, its passfile and the
        ``pg_receivewal`` it runs (PITR_DIR/bin)."""
        settings = self.settings
        for directory in (settings.directory, settings.barman_home, settings.directory / "log"):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os_user = pwd.getpwuid(os.geteuid()).pw_name
        try:
            path_prefix = write_programs(settings.programs_dir, self.bindir)
        except ProgramsError as error:
            raise BarmanError(str(error)) from None
        text = barman_config(
            settings,
            self.url,
            os_user=os_user,
            path_prefix=path_prefix,
            connect_timeout=self.connect_timeout,
        )
        write_private(settings.passfile, passfile_text(self.url))
        write_private(settings.barman_config, text)

    # -- running ------------------------------------------------------------------------------

    def command(self, *args: str, json_output: bool = False) -> list[str]:
        base = [str(self.settings.barman), "-c", str(self.settings.barman_config)]
        if json_output:
            base += ["-f", "json"]
        return [*base, *args]

    def _invoke(
        self, args: tuple[str, ...], timeout: float, json_output: bool = False
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                self.command(*args, json_output=json_output),
                env=barman_environment(self.settings),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise BarmanError(f"barman {args[0]} did not finish within {timeout:g}s") from None
        except OSError as error:
            raise BarmanError(f"cannot run {self.settings.barman}: {error.strerror}") from None

    def run(
        self, *args: str, timeout: float = DEFAULT_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = self._invoke(args, timeout)
        if check and result.returncode != 0:
            raise BarmanError(f"barman {args[0]}: {_error_of(result.stdout, result.stderr)}")
        return result

    def run_json(self, *args: str, timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> Any:
        """The server's part of Barman's JSON answer (``{"dbops": ...}``)."""
        result = self._invoke(args, timeout, json_output=True)
        try:
            data = json.loads(result.stdout)
        except ValueError:
            data = None
        if not isinstance(data, dict) or (
            check and result.returncode != 0 and "_EXCEPTION" in data
        ):
            raise BarmanError(f"barman {args[0]}: {_error_of(result.stdout, result.stderr)}")
        if any(key in data for key in ("_EXCEPTION", "_ERROR")) and SERVER_NAME not in data:
            raise BarmanError(f"barman {args[0]}: {_error_of(result.stdout, result.stderr)}")
        return data.get(SERVER_NAME)

    # -- commands -----------------------------------------------------------------------------

    def receiving(self) -> bool:
        """Whether ``receive-wal`` is streaming, tested as Barman tests it: by its lock. An
        unusable lock file counts as not streaming: ``barman cron`` then says what is wrong."""
        descriptor, held = _try_receive_wal_lock(self.settings)
        if descriptor is not None:
            os.close(descriptor)
        return held

    def cron(self) -> None:
        """Start ``receive-wal`` when it is not running (creating the slot when missing), move
        streamed WAL into the archive, and apply retention."""
        self.run("cron", timeout=600)

    def check(self) -> dict[str, dict[str, str]]:
        """Barman's checks: ``{name: {"status": "OK"|"FAILED", "hint": ...}}``."""
        data = self.run_json("check", SERVER_NAME, check=False)
        if not isinstance(data, dict):
            raise BarmanError("barman check: no answer for the server")
        return {
            str(name): {"status": str(item.get("status", "")), "hint": str(item.get("hint", ""))}
            for name, item in data.items()
            if isinstance(item, dict)
        }

    def backups(self) -> list[BackupInfo]:
        """Every base backup Barman knows, oldest first (one call: ``list-backups``)."""
        listed = self.run_json("list-backups", SERVER_NAME)
        result = [_listed_backup(entry) for entry in listed or [] if isinstance(entry, dict)]
        result.sort(key=lambda backup: backup.id)
        return result

    def show(self, backup_id: str) -> BackupInfo:
        """One backup with its start, WAL span and timeline (``show-backup``)."""
        shown = self.run_json("show-backup", SERVER_NAME, backup_id)
        if not isinstance(shown, dict) or "base_backup_information" not in shown:
            raise BarmanError(f"barman show-backup: no backup {backup_id}")
        base = shown.get("base_backup_information") or {}
        return BackupInfo(
            id=backup_id,
            status=str(shown.get("status") or "UNKNOWN"),
            begin_time=_number(base.get("begin_time_timestamp")),
            end_time=_number(base.get("end_time_timestamp")),
            size_bytes=int(_number(base.get("backup_size_bytes")) or 0),
            wal_size_bytes=int(_number(base.get("wal_size_bytes")) or 0),
            begin_wal=base.get("begin_wal"),
            end_wal=base.get("end_wal"),
            begin_lsn=base.get("begin_lsn"),
            end_lsn=base.get("end_lsn"),
            timeline=_integer(base.get("timeline")),
        )

    def backup(self, timeout: float = 6 * 3600) -> str:
        """Take a base backup and wait until the WAL it needs is archived; its id.

        ``barman backup`` runs every check itself before it starts, and the backups before and
        after it are read from Barman's directory: no ``barman check`` and no ``list-backups``
        around it (each Barman start-up costs a few tenths of a second, more on a busy host).
        """
        before = self._backup_ids()
        # Barman refuses a first backup until one WAL file has reached the archive, and its own
        # check switches WAL only when something was written since the last switch. (`check`
        # also gives a `receive-wal` that `cron` has just started the time to connect.)
        if (
            not self._archive_holds_wal()
            and self.check().get("wal_archive", {}).get("status") == "FAILED"
        ):
            self.switch_wal(archive=True)
        self.run("backup", "--wait", "--wait-timeout", "600", SERVER_NAME, timeout=timeout)
        after = sorted(self._backup_ids() - before)
        if not after:
            raise BarmanError("barman backup finished but no new backup is listed")
        return after[-1]

    def _backup_ids(self) -> set[str]:
        """The backups Barman keeps, by their directories (``base/<id>``)."""
        try:
            entries = list((self.settings.barman_home / SERVER_NAME / "base").iterdir())
        except FileNotFoundError:
            return set()
        except OSError as error:
            raise BarmanError(f"cannot read Barman's backups: {error.strerror}") from None
        return {entry.name for entry in entries if _BACKUP_ID.match(entry.name)}

    def _archive_holds_wal(self) -> bool:
        """Whether Barman's WAL catalogue (``wals/*xlog.db``) lists anything yet."""
        wals = self.settings.barman_home / SERVER_NAME / "wals"
        try:
            return any(catalogue.stat().st_size > 0 for catalogue in wals.glob("*xlog.db"))
        except OSError:
            return False

    def switch_wal(self, *, archive: bool) -> None:
        """Close the current WAL segment; with ``archive``, wait until it is archived."""
        extra = ("--archive", "--archive-timeout", "60") if archive else ()
        self.run("switch-wal", "--force", *extra, SERVER_NAME, timeout=120)

    def archive_wal(self) -> None:
        """Move the segments ``receive-wal`` has completed into the archive, now."""
        self.run("archive-wal", SERVER_NAME, timeout=300)

    def stop_receive_wal(self) -> None:
        result = self.run("receive-wal", "--stop", SERVER_NAME, check=False)
        if result.returncode != 0 and "no such process" not in result.stderr:
            raise BarmanError(
                f"barman receive-wal --stop: {_error_of(result.stdout, result.stderr)}"
            )

    def reset_receive_wal(self) -> None:
        """After the slot was lost: restart streaming from the server's current position."""
        self.stop_receive_wal()
        self.run("receive-wal", "--reset", SERVER_NAME)

    def create_slot(self) -> None:
        self.run("receive-wal", "--create-slot", SERVER_NAME)

    def status(self) -> dict[str, str]:
        data = self.run_json("status", SERVER_NAME) or {}
        return {str(k): str(v.get("message", "")) for k, v in data.items() if isinstance(v, dict)}


def make_barman(settings: Settings) -> Barman:
    """The configured server. Here rather than in :mod:`ops.pitr.service`, so that `ops pitr`
    commands do not import the sidecar's scheduler and metrics to run one Barman command."""
    return Barman(
        settings.pitr,
        settings.db.url,
        bindir=settings.backup.bindir,
        connect_timeout=settings.db.connect_timeout,
    )


def _listed_backup(entry: dict[str, Any]) -> BackupInfo:
    return BackupInfo(
        id=str(entry.get("backup_id")),
        status=str(entry.get("status") or "UNKNOWN"),
        begin_time=None,
        end_time=_number(entry.get("end_time_timestamp")),
        size_bytes=int(_number(entry.get("size_bytes")) or 0),
        wal_size_bytes=int(_number(entry.get("wal_size_bytes")) or 0),
        retention_status=str(entry.get("retention_status") or "") or None,
    )


def _number(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "", "None") else None
    except (TypeError, ValueError):
        return None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None
