"""Settings of the sidecar and the backup jobs, read with the database settings in one pass.

``load_settings()`` reports every problem of the whole environment at once, database and
sidecar alike, before any connection or thread starts.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from db.pgurl import PgUrl
from db.redact import REDACTED, redact, redact_url
from db.seed.settings import SeedSettings, read_seed_settings
from db.settings import (
    DbSettings,
    EnvReader,
    is_application_name,
    read_db_settings,
    read_postgres_url,
)
from ops.collectors.base import COLLECTOR_NAMES
from ops.offsite.settings import OffsiteSettings, read_offsite_settings
from ops.pitr.settings import PitrSettings, read_bounded_duration, read_pitr_settings

BACKUP_FORMATS = ("custom", "directory")
LOG_FORMATS = ("text", "json")
_COMPRESSION = re.compile(r"^(?:[0-9]|(?P<method>none|gzip|lz4|zstd)(?::(?P<level>\d{1,2}))?)$")
# The levels pg_dump 16+ accepts per method (src/common/compression.c); "none" takes none.
COMPRESSION_LEVELS = {"gzip": (1, 9), "lz4": (1, 12), "zstd": (1, 22), "none": (0, 0)}
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?",
    re.ASCII,
)
_LISTEN = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^:\s]*):(?P<port>\d{1,5})$")


def validate_cron(expression: str) -> str | None:
    """Why a 5-field crontab expression is invalid, or ``None`` when APScheduler accepts it."""
    from apscheduler.triggers.cron import CronTrigger

    if len(expression.split()) != 5:
        return "must be a 5-field cron expression (minute hour day month weekday), e.g. '0 3 * * *'"
    try:
        trigger = CronTrigger.from_crontab(expression, timezone=UTC)
    except ValueError as exc:
        return f"invalid cron expression: {exc}"
    if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
        return "never fires (no such date)"
    return None


def parse_listen(text: str) -> tuple[str, int]:
    match = _LISTEN.match(text.strip())
    if not match or not 0 < int(match.group("port")) < 65536:
        raise ValueError("must be HOST:PORT, e.g. 0.0.0.0:9188")
    host = match.group("host").strip("[]")
    if not _is_listen_host(host, bracketed=match.group("host").startswith("[")):
        raise ValueError("host must be an IP address or a host name, e.g. 0.0.0.0:9188")
    return host, int(match.group("port"))


def _is_listen_host(host: str, *, bracketed: bool) -> bool:
    """An address the server could bind: checked here, not found out at bind time."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if bracketed or re.fullmatch(r"[0-9.]+", host):
            return False  # 999.1.1.1 would go to DNS as a name
        return host == "" or _HOST_NAME.fullmatch(host) is not None
    return address.version == 6 if bracketed else address.version == 4


@dataclass(frozen=True)
class BackupSettings:
    schedule: str = "0 3 * * *"
    directory: Path = Path("/var/lib/dbops/backups")
    format: str = "custom"
    compression: str = "1"
    jobs: int = 1
    keep_last: int = 7
    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 6
    verify_schedule: str = "30 4 * * *"
    max_age: float = 26 * 3600.0
    bindir: Path | None = None  # PG_BINDIR: where pg_dump/pg_restore live; None = PATH


@dataclass(frozen=True)
class SidecarSettings:
    listen_host: str = "0.0.0.0"
    listen_port: int = 9188
    log_format: str = "text"
    log_level: str = "info"
    query_timeout: float = 2.0
    lock_timeout: float = 0.5
    collector_ttl: float = 60.0
    top_n: int = 20
    pool_size: int = 2
    application_name: str = "dbops-sidecar"
    # MONITOR_DATABASE_URL: the exporter's own login (a pg_monitor role); None = the db settings
    monitor_url: PgUrl | None = field(default=None, repr=False, metadata={"secret": True})
    # OPS_ALERTS_TOKEN: the bearer token Alertmanager sends to POST /alerts; None = webhook off
    alerts_token: str | None = field(default=None, metadata={"secret": True})
    http_threads: int = 8
    http_connections: int = 2000
    http_idle_timeout: float = 15.0
    http_backlog: int = 1024
    http_deadline: float = 5.0
    # OPS_COLLECTORS_DISABLED: collectors left out (e.g. what CloudNativePG already exports)
    disabled_collectors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    db: DbSettings
    seed: SeedSettings
    backup: BackupSettings
    sidecar: SidecarSettings
    pitr: PitrSettings = field(default_factory=PitrSettings)
    offsite: OffsiteSettings = field(default_factory=OffsiteSettings)


def read_backup_settings(reader: EnvReader) -> BackupSettings:
    schedule = reader.string("BACKUP_SCHEDULE", BackupSettings.schedule)
    if (reason := validate_cron(schedule)) is not None:
        reader.problem("BACKUP_SCHEDULE", schedule, reason)
    verify_schedule = reader.string("BACKUP_VERIFY_SCHEDULE", BackupSettings.verify_schedule)
    if (reason := validate_cron(verify_schedule)) is not None:
        reader.problem("BACKUP_VERIFY_SCHEDULE", verify_schedule, reason)
    backup_format = reader.choice("BACKUP_FORMAT", BackupSettings.format, BACKUP_FORMATS)
    compression = reader.string("BACKUP_COMPRESSION", BackupSettings.compression).lower()
    if (reason := compression_problem(compression)) is not None:
        reader.problem("BACKUP_COMPRESSION", compression, reason)
    jobs = reader.integer("BACKUP_JOBS", BackupSettings.jobs, minimum=1, maximum=64)
    if jobs > 1 and backup_format != "directory":
        reader.problem("BACKUP_JOBS", str(jobs), "parallel dumps need BACKUP_FORMAT=directory")
    return BackupSettings(
        schedule=schedule,
        directory=Path(reader.string("BACKUP_DIR", str(BackupSettings.directory))),
        format=backup_format,
        compression=compression,
        jobs=jobs,
        keep_last=reader.integer("BACKUP_KEEP_LAST", BackupSettings.keep_last, minimum=1),
        keep_daily=reader.integer("BACKUP_KEEP_DAILY", BackupSettings.keep_daily, minimum=0),
        keep_weekly=reader.integer("BACKUP_KEEP_WEEKLY", BackupSettings.keep_weekly, minimum=0),
        keep_monthly=reader.integer("BACKUP_KEEP_MONTHLY", BackupSettings.keep_monthly, minimum=0),
        verify_schedule=verify_schedule,
        max_age=reader.duration("BACKUP_MAX_AGE", BackupSettings.max_age, minimum=60),
        bindir=_read_bindir(reader),
    )


def compression_problem(compression: str) -> str | None:
    match = _COMPRESSION.match(compression)
    if not match:
        return "must be 0-9 or METHOD[:LEVEL] (gzip, lz4, zstd)"
    method, level = match.group("method"), match.group("level")
    if method is not None and level is not None:
        low, high = COMPRESSION_LEVELS[method]
        if not low <= int(level) <= high:
            return f"{method} level must be {low}-{high}" if high else "none takes no level"
    return None


def _read_bindir(reader: EnvReader) -> Path | None:
    """``PG_BINDIR`` picks the client tools when several PostgreSQL versions are installed."""
    text = reader.raw("PG_BINDIR")
    if text is None:
        return None
    if not (Path(text) / "pg_dump").is_file():
        reader.problem("PG_BINDIR", text, "has no pg_dump")
    return Path(text)


def read_listen(reader: EnvReader, name: str, default: str) -> tuple[str, int]:
    """``HOST:PORT`` from ``name``; on a bad value the problem is recorded and the default used."""
    listen = reader.string(name, default)
    try:
        return parse_listen(listen)
    except ValueError as exc:
        reader.problem(name, listen, str(exc))
        return parse_listen(default)


def read_sidecar_settings(reader: EnvReader) -> SidecarSettings:
    host, port = read_listen(reader, "OPS_LISTEN", "0.0.0.0:9188")
    return SidecarSettings(
        listen_host=host,
        listen_port=port,
        log_format=reader.choice("OPS_LOG_FORMAT", "text", LOG_FORMATS),
        log_level=reader.choice("OPS_LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
        query_timeout=reader.duration("OPS_QUERY_TIMEOUT", 2.0, minimum=0.01, postgres=True),
        lock_timeout=reader.duration("OPS_LOCK_TIMEOUT", 0.5, minimum=0.001, postgres=True),
        collector_ttl=reader.duration("OPS_COLLECTOR_TTL", 60.0, minimum=1),
        top_n=reader.integer("OPS_TOP_N", 20, minimum=1, maximum=500),
        pool_size=reader.integer("OPS_POOL_SIZE", 2, minimum=1, maximum=20),
        application_name=_read_application_name(reader),
        monitor_url=_read_monitor_url(reader),
        alerts_token=_read_alerts_token(reader),
        http_threads=reader.integer("OPS_HTTP_THREADS", 8, minimum=1, maximum=64),
        http_connections=reader.integer("OPS_HTTP_CONNECTIONS", 2000, minimum=16, maximum=65536),
        http_idle_timeout=read_bounded_duration(reader, "OPS_HTTP_IDLE_TIMEOUT", 15.0, 1.0, 3600.0),
        http_backlog=reader.integer("OPS_HTTP_BACKLOG", 1024, minimum=1, maximum=65535),
        http_deadline=read_bounded_duration(reader, "OPS_HTTP_DEADLINE", 5.0, 1.0, 300.0),
        disabled_collectors=_read_disabled_collectors(reader),
    )


_TOKEN = re.compile(r"^[\x21-\x7e]{16,4096}$")


def _read_alerts_token(reader: EnvReader) -> str | None:
    """``OPS_ALERTS_TOKEN`` (or ``_FILE``): never defaulted; without it the webhook is off."""
    token = reader.secret("OPS_ALERTS_TOKEN")
    if token is None:
        return None
    token = token.strip()
    if not _TOKEN.match(token):
        reason = (
            "the token must be 16 to 4096 visible ASCII characters (no spaces), "
            "e.g. from `openssl rand -hex 32`"
        )
        path = reader.raw("OPS_ALERTS_TOKEN_FILE")
        if path is not None:
            reader.problem("OPS_ALERTS_TOKEN_FILE", path, reason)
        else:
            reader.problem("OPS_ALERTS_TOKEN", None, reason, secret=True)
        return None
    return token


def _read_disabled_collectors(reader: EnvReader) -> tuple[str, ...]:
    """``OPS_COLLECTORS_DISABLED``: comma-separated collector names; a misspelt one is an error,
    not a silently duplicated metric."""
    text = reader.raw("OPS_COLLECTORS_DISABLED")
    if text is None:
        return ()
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in COLLECTOR_NAMES]
    if unknown:
        reader.problem(
            "OPS_COLLECTORS_DISABLED",
            text,
            f"unknown collector {', '.join(map(repr, unknown))};"
            f" known: {', '.join(COLLECTOR_NAMES)}",
        )
        return ()
    return tuple(name for name in COLLECTOR_NAMES if name in names)


def _read_application_name(reader: EnvReader) -> str:
    name = reader.string("OPS_APPLICATION_NAME", SidecarSettings.application_name)
    if not is_application_name(name, 50):  # room for the "-ready" and "-monitor" suffixes
        reader.problem("OPS_APPLICATION_NAME", name, "must be printable ASCII, <= 50 chars")
    return name


def _read_monitor_url(reader: EnvReader) -> PgUrl | None:
    """``MONITOR_DATABASE_URL`` (or ``_FILE``), checked like ``DATABASE_URL``; without a
    password in it, the monitor role's ``MONITOR_DB_PASSWORD`` is used."""
    return read_postgres_url(reader, "MONITOR_DATABASE_URL", "MONITOR_DB_PASSWORD")[1]


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Everything ``ops`` reads, or :class:`db.settings.ConfigError` listing every problem."""
    reader = EnvReader(environ)
    settings = Settings(
        db=read_db_settings(reader),
        seed=read_seed_settings(reader),
        backup=read_backup_settings(reader),
        sidecar=read_sidecar_settings(reader),
        pitr=read_pitr_settings(reader),
        offsite=read_offsite_settings(reader),
    )
    if settings.pitr.enabled:
        _check_pitr_login(reader, settings.db)
    if settings.pitr.drill_source == "offsite" and not settings.offsite.enabled:
        reader.problem(
            "PITR_DRILL_SOURCE", "offsite", "needs OFFSITE_S3_URL (the store to restore from)"
        )
    reader.finish()
    return settings


def _check_pitr_login(reader: EnvReader, db: DbSettings) -> None:
    """Barman gets the login through a conninfo and a passfile: both must be able to hold it."""
    from ops.pitr.config import conninfo, passfile_text

    try:
        conninfo(db.url, "check")
        passfile_text(db.url)
    except ValueError as error:
        reader.problem("PITR_ENABLED", "true", f"{error}; Barman cannot be given this login")


def describe(settings: Settings) -> dict[str, dict[str, Any]]:
    """The settings as plain data with every secret redacted, for ``ops config show``."""
    shown: dict[str, dict[str, Any]] = {}
    for section in fields(settings):
        value = getattr(settings, section.name)
        entries: dict[str, Any] = {}
        for item in fields(value):
            entry = getattr(value, item.name)
            if isinstance(entry, PgUrl):
                entry = redact_url(entry)
            elif item.metadata.get("secret"):
                entry = REDACTED if entry is not None else None
            elif isinstance(entry, Path | str):
                entry = redact(str(entry))  # a password pasted where it does not belong
            entries[item.name] = entry
        shown[section.name] = entries
    return shown
