"""Settings of point-in-time recovery, read in the same pass as everything else.

Every value is checked here, before Barman is configured or started, so a typo is one
``VARIABLE value: reason`` line with the others and exit 2, never a Barman traceback later.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from db.settings import EnvReader

DRILL_SOURCES = ("local", "offsite")  # offsite: restore from the object store alone
DEFAULT_BARMAN = Path("/opt/barman/bin/barman")
SERVER_NAME = "dbops"  # Barman's name for the one server it backs up
# The file in barman_home that Barman's `receive-wal` holds locked while it streams.
RECEIVE_WAL_LOCK = f".{SERVER_NAME}-receive-wal.lock"
_SIZE = re.compile(r"^\s*(\d{1,16})\s*(kB|MB|GB|TB)?\s*$")
_SIZE_UNITS = {"kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4, None: 1024**2}
_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
# PostgreSQL's own bounds for max_slot_wal_keep_size (an int in MB), and a floor below which
# one busy minute would already lose the slot.
MIN_SLOT_KEEP_BYTES = 64 * 1024**2
MAX_SLOT_KEEP_BYTES = (2**31 - 1) * 1024**2
MAX_RETENTION_DAYS = 3650


def parse_size(text: str) -> int:
    """Bytes in a PostgreSQL memory size: ``512MB``, ``10GB``, ``1TB``, ``65536kB``; a bare
    number is megabytes, as for ``max_slot_wal_keep_size``."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError("not a size (examples: 512MB, 10GB; units kB, MB, GB, TB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def postgres_size(size_bytes: int) -> str:
    """``size_bytes`` as PostgreSQL writes it in a setting, in whole megabytes."""
    return f"{size_bytes // 1024**2}MB"


@dataclass(frozen=True)
class PitrSettings:
    enabled: bool = False
    directory: Path = Path("/var/lib/dbops/pitr")
    basebackup_schedule: str = "0 2 * * *"
    retention_days: int = 7
    min_redundancy: int = 1
    archive_timeout: float = 60.0
    max_slot_wal_keep_size: int = 10 * 1024**3
    drill_schedule: str = "30 5 * * *"
    drill_source: str = "local"
    slot_name: str = "dbops_barman"
    # How long streaming may be down before /healthz reports it.
    streaming_down_limit: float = 300.0
    cron_interval: float = 30.0  # how often `barman cron` supervises streaming and retention
    # The rsync processes `barman recover` copies a base backup with (its parallel_jobs).
    recovery_jobs: int = 2
    barman: Path = DEFAULT_BARMAN

    @property
    def barman_config(self) -> Path:
        return self.directory / "barman.conf"

    @property
    def passfile(self) -> Path:
        return self.directory / "pgpass"

    @property
    def programs_dir(self) -> Path:
        """Where the client programs Barman runs are found first (see ops.pitr.programs)."""
        return self.directory / "bin"

    @property
    def barman_home(self) -> Path:
        return self.directory / "barman"

    @property
    def state_file(self) -> Path:
        return self.directory / "state.json"

    @property
    def scratch_dir(self) -> Path:
        return self.directory / "scratch"


def read_pitr_settings(reader: EnvReader) -> PitrSettings:
    from ops.settings import validate_cron

    enabled = reader.boolean("PITR_ENABLED", PitrSettings.enabled)
    schedules = {}
    for name, default in (
        ("PITR_BASEBACKUP_SCHEDULE", PitrSettings.basebackup_schedule),
        ("PITR_DRILL_SCHEDULE", PitrSettings.drill_schedule),
    ):
        schedules[name] = reader.string(name, default)
        if (reason := validate_cron(schedules[name])) is not None:
            reader.problem(name, schedules[name], reason)
    return PitrSettings(
        enabled=enabled,
        directory=_read_directory(reader),
        basebackup_schedule=schedules["PITR_BASEBACKUP_SCHEDULE"],
        retention_days=_read_retention(reader),
        min_redundancy=reader.integer(
            "PITR_MIN_REDUNDANCY", PitrSettings.min_redundancy, minimum=1, maximum=1000
        ),
        archive_timeout=read_bounded_duration(
            reader, "PITR_ARCHIVE_TIMEOUT", PitrSettings.archive_timeout, 1.0, 86400.0
        ),
        max_slot_wal_keep_size=_read_slot_keep_size(reader),
        drill_schedule=schedules["PITR_DRILL_SCHEDULE"],
        drill_source=reader.choice("PITR_DRILL_SOURCE", PitrSettings.drill_source, DRILL_SOURCES),
        slot_name=_read_slot_name(reader),
        streaming_down_limit=read_bounded_duration(
            reader,
            "PITR_STREAMING_DOWN_LIMIT",
            PitrSettings.streaming_down_limit,
            10.0,
            7 * 86400.0,
        ),
        cron_interval=read_bounded_duration(
            reader, "PITR_CRON_INTERVAL", PitrSettings.cron_interval, 5.0, 3600.0
        ),
        recovery_jobs=reader.integer(
            "PITR_RECOVERY_JOBS", PitrSettings.recovery_jobs, minimum=1, maximum=32
        ),
        barman=_read_barman(reader, enabled),
    )


def _read_directory(reader: EnvReader) -> Path:
    text = reader.string("PITR_DIR", str(PitrSettings.directory))
    if not text.startswith("/") or not text.isprintable():
        reader.problem("PITR_DIR", text, "must be an absolute path of printable characters")
        return PitrSettings.directory
    if ":" in text:  # PITR_DIR/bin leads the PATH Barman searches for pg_receivewal
        reader.problem("PITR_DIR", text, "must not contain ':' (it goes into a PATH)")
        return PitrSettings.directory
    return Path(text)


def read_bounded_duration(
    reader: EnvReader, name: str, default: float, minimum: float, maximum: float
) -> float:
    """A duration from ``minimum`` up to a bound of the setting's own (the sidecar's settings
    use it too)."""
    seconds = reader.duration(name, default, minimum=minimum)
    if seconds > maximum:
        reader.problem(name, reader.raw(name), f"must be at most {maximum:g}s")
        return default
    return seconds


def _read_retention(reader: EnvReader) -> int:
    """``PITR_RETENTION``: the recovery window, in whole days (Barman counts days)."""
    text = reader.raw("PITR_RETENTION")
    if text is None:
        return PitrSettings.retention_days
    seconds = reader.duration("PITR_RETENTION", -1.0)
    if seconds == -1.0:
        return PitrSettings.retention_days  # the problem is recorded
    days, rest = divmod(seconds, 86400)
    if rest or not 1 <= days <= MAX_RETENTION_DAYS:
        reader.problem(
            "PITR_RETENTION", text, f"must be whole days from 1d to {MAX_RETENTION_DAYS}d"
        )
        return PitrSettings.retention_days
    return int(days)


def _read_slot_keep_size(reader: EnvReader) -> int:
    text = reader.raw("PITR_MAX_SLOT_WAL_KEEP_SIZE")
    if text is None:
        return PitrSettings.max_slot_wal_keep_size
    try:
        size = parse_size(text)
    except ValueError as error:
        reader.problem("PITR_MAX_SLOT_WAL_KEEP_SIZE", text, str(error))
        return PitrSettings.max_slot_wal_keep_size
    if not MIN_SLOT_KEEP_BYTES <= size <= MAX_SLOT_KEEP_BYTES:
        reader.problem(
            "PITR_MAX_SLOT_WAL_KEEP_SIZE",
            text,
            "must be from 64MB to 2147483647MB: without a cap a stopped sidecar fills the disk",
        )
        return PitrSettings.max_slot_wal_keep_size
    return size


def _read_slot_name(reader: EnvReader) -> str:
    name = reader.string("PITR_SLOT_NAME", PitrSettings.slot_name)
    if not _SLOT_NAME.match(name):
        reader.problem("PITR_SLOT_NAME", name, "must be 1-63 of a-z, 0-9 and _")
        return PitrSettings.slot_name
    return name


def _read_barman(reader: EnvReader, enabled: bool) -> Path:
    """``PITR_BARMAN``: the ``barman`` program; by default on PATH, else the image's."""
    text = reader.raw("PITR_BARMAN")
    if text is None:
        found = shutil.which("barman")
        path = Path(found) if found else DEFAULT_BARMAN
        if enabled and not path.is_file():
            reader.problem(
                "PITR_ENABLED", "true", "barman is not installed (set PITR_BARMAN to its path)"
            )
        return path
    path = Path(text)
    if not path.is_file():
        reader.problem("PITR_BARMAN", text, "no such program")
    return path
