"""Recovery from the object store alone: no Barman catalogue, no PITR_DIR, only the store.

The same order as the local restore (ops/pitr/restore.py): everything that can refuse is
decided first (credentials and bucket, the target against what the store holds, the base
backup, the destination), then ``barman-cloud-restore`` writes the base backup and the
recovery settings are added.

How WAL reaches the server during replay, two ways:

- ``fetch`` (the default): ``restore_command`` runs ``barman-cloud-wal-restore`` through a
  small wrapper script. The credentials are in an env file beside it, in a private directory
  next to the data directory (mode 0700, the files 0600/0700, owned by the server's user):
  not in ``postgresql.auto.conf`` (readable by every role with ``pg_read_all_settings`` and
  copied into every base backup), not in the wrapper's or Barman Cloud's arguments (``ps``),
  and not inside the data directory (the next base backup would copy them).
- ``stage``: for a server that has no Barman Cloud (the official postgres image), the WAL from
  the backup's start to the end of the store is downloaded now into ``dbops_offsite_wal``
  inside the data directory and ``restore_command`` only copies from there. The server then
  never sees the credentials at all.
"""

from __future__ import annotations

import os
import pwd
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from ops.offsite.cloudread import CloudError, CloudReader, StoredWal, wal_order
from ops.offsite.settings import OffsiteSettings
from ops.offsite.store import check
from ops.pitr.barman import BackupInfo
from ops.pitr.config import write_private
from ops.pitr.restore import RestoreRefused, Target, choose_backup, format_lsn, prepare_destination
from ops.pitr.status import PitrStatus

STAGED_WAL = "dbops_offsite_wal"
RECOVERY_TARGETS = (
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
)
RECOVERY_DIR_SUFFIX = ".dbops-offsite"  # beside the data directory: the wrapper and its env
FETCH_PARALLEL = 4
# barman-cloud-wal-restore exits 1 when the file is not in the store (the end of the archive);
# anything else (store unreachable, refused credentials) must stop recovery, not end it early
# and promote at the wrong point: PostgreSQL aborts on an exit status above 125.
_WRAPPER = """#!/bin/sh
# restore_command of a recovery from the object store (ops pitr restore --from offsite).
# The store's credentials are in store.env beside this file, never in arguments or settings.
set -a
. {env}
set +a
{program} {args} "$1" "$2"
code=$?
[ "$code" -le 1 ] && exit "$code"
echo "barman-cloud-wal-restore failed (exit $code): recovery stops rather than ends early" >&2
exit 126
"""


class OffsiteRefused(RestoreRefused):
    """The store cannot serve this recovery (credentials, bucket, reach); nothing changed."""


@dataclass
class OffsiteRestoreResult:
    backup_id: str
    target: str
    destination: str
    kept: str | None
    seconds: float
    wal: str  # fetch | stage
    recovery_dir: str | None  # the wrapper and its env (fetch): remove it after promotion
    staged_wal_files: int = 0


def store_status(cloud: CloudReader) -> tuple[PitrStatus, list[StoredWal]]:
    """What the store can recover, as the local catalogue's :class:`PitrStatus`: its base
    backups, and its newest WAL segment with the time it was uploaded (the latest point the
    store surely covers)."""
    status = PitrStatus(gathered_at=time.time())
    status.backups = cloud.backups()
    wals = cloud.wal_files()
    segments = [wal for wal in wals if wal.is_segment]
    status.archived_wal_files = len(wals)
    if segments:
        status.last_wal_archived = segments[-1].name
        # S3 keeps LastModified in whole seconds: the upload ended before the next second.
        status.last_wal_archived_at = max(wal.uploaded_at for wal in segments) + 1.0
    return status, wals


def check_store(offsite: OffsiteSettings) -> None:
    """Credentials and bucket, in one line; a recovery never creates the bucket."""
    result = check(replace(offsite, create_bucket=False))
    if not result.ok:
        raise OffsiteRefused(f"the object store: {result.detail}")


def plan(cloud: CloudReader, target: Target) -> tuple[BackupInfo, list[StoredWal], PitrStatus]:
    check_store(cloud.offsite)
    try:
        status, wals = store_status(cloud)
    except CloudError as error:
        raise OffsiteRefused(str(error)) from None
    if not status.good_backups:
        raise OffsiteRefused(
            f"no base backup in the object store under {cloud.offsite.url}/dbops "
            "(is off-host shipping on?)"
        )
    if status.last_wal_archived is None:
        raise OffsiteRefused(f"no WAL in the object store under {cloud.offsite.url}/dbops/wals")
    chosen = choose_backup(status, target)
    return chosen, wals, status


def needed_wal(wals: list[StoredWal], backup: BackupInfo) -> list[StoredWal]:
    """Every history file, and every segment from the backup's first one onwards on its
    timeline or a later one."""
    begin = backup.begin_wal or ""
    timeline = begin[:8] if len(begin) == 24 else "00000000"
    start = wal_order(begin) if len(begin) == 24 else ("", "")
    return [
        wal
        for wal in wals
        if not wal.is_segment or (wal.name[:8] >= timeline and wal_order(wal.name) >= start)
    ]


def server_user() -> pwd.struct_passwd | None:
    """Who will run the restored server: ourselves, or as root the ``postgres`` user (postgres
    refuses to run as root), as the scratch server does."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return None


def _hand_over(paths: list[Path], user: pwd.struct_passwd | None) -> None:
    if user is None:
        return
    for top in paths:
        for directory, dirs, files in os.walk(top):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(directory, name), user.pw_uid, user.pw_gid)
        os.lchown(top, user.pw_uid, user.pw_gid)


def env_file_text(offsite: OffsiteSettings) -> str:
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(offsite.environment().items()))


def write_fetch_wrapper(cloud: CloudReader, destination: Path) -> Path:
    """The private directory beside ``destination`` with ``restore-wal`` and ``store.env``."""
    assert cloud.offsite.url is not None
    directory = destination.with_name(destination.name + RECOVERY_DIR_SUFFIX)
    directory.mkdir(mode=0o700, exist_ok=True)
    directory.chmod(0o700)
    env_file = directory / "store.env"
    write_private(env_file, env_file_text(cloud.offsite))
    args = " ".join(shlex.quote(a) for a in [*cloud.common_args(), cloud.offsite.url, "dbops"])
    wrapper = directory / "restore-wal"
    write_private(
        wrapper,
        _WRAPPER.format(
            env=shlex.quote(str(env_file)),
            program=shlex.quote(str(cloud.program("wal-restore"))),
            args=args,
        ),
    )
    wrapper.chmod(0o700)
    return directory


def stage_wal(cloud: CloudReader, wals: list[StoredWal], directory: Path, timeout: float) -> int:
    """Download ``wals`` into ``directory`` with barman-cloud-wal-restore, a few at a time."""
    directory.mkdir(mode=0o700, exist_ok=True)
    deadline = time.monotonic() + timeout

    def fetch(wal: StoredWal) -> None:
        remaining = max(1.0, deadline - time.monotonic())
        cloud.fetch_wal(wal.name, directory / wal.name, timeout=remaining)

    with ThreadPoolExecutor(FETCH_PARALLEL) as pool:
        for _ in pool.map(fetch, wals):
            pass
    return len(wals)


def recovery_settings(restore_command: str, target: Target) -> str:
    def quoted(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    # Every target is reset first: the base backup's own postgresql.auto.conf may hold the
    # settings of an earlier recovery, and the last line of a setting wins.
    lines = [
        "# Recovery from the object store (ops pitr restore --from offsite)",
        f"restore_command = {quoted(restore_command)}",
        "recovery_target_timeline = 'latest'",
        *(f"{name} = ''" for name in RECOVERY_TARGETS),
    ]
    if target.kind == "time":
        assert target.time is not None
        lines.append(f"recovery_target_time = {quoted(target.time.isoformat())}")
    elif target.kind == "lsn":
        assert target.lsn is not None
        lines.append(f"recovery_target_lsn = {quoted(format_lsn(target.lsn))}")
    if target.kind != "latest":
        lines.append("recovery_target_action = 'promote'")
    return "\n".join(lines) + "\n"


def restore_from_store(
    cloud: CloudReader,
    target: Target,
    destination: Path,
    *,
    replace_existing: bool = False,
    wal: str = "fetch",
    timeout: float = 6 * 3600,
) -> OffsiteRestoreResult:
    """Restore the newest base backup before ``target`` from the store into ``destination``
    and set up recovery to ``target``; :class:`RestoreRefused` before anything changes."""
    assert wal in ("fetch", "stage")
    backup, wals, _ = plan(cloud, target)
    destination = destination.absolute()
    kept = prepare_destination(destination, replace=replace_existing)
    destination.mkdir(parents=True, exist_ok=True, mode=0o700)
    started = time.monotonic()
    where = f"; what {destination} held is in {kept}" if kept else ""
    recovery_dir: Path | None = None
    staged = 0
    try:
        cloud.restore(backup.id, destination, timeout=timeout)
        if wal == "stage":
            staged_dir = destination / STAGED_WAL
            staged = stage_wal(cloud, needed_wal(wals, backup), staged_dir, timeout)
            command = f"cp {shlex.quote(str(staged_dir))}/%f %p"
        else:
            recovery_dir = write_fetch_wrapper(cloud, destination)
            command = f"{shlex.quote(str(recovery_dir / 'restore-wal'))} %f %p"
    except CloudError as error:
        raise CloudError(f"{error}{where}") from None
    with (destination / "postgresql.auto.conf").open("a", encoding="utf-8") as handle:
        handle.write(recovery_settings(command, target))
    (destination / "recovery.signal").touch()
    destination.chmod(0o700)
    _hand_over([p for p in (destination, recovery_dir) if p is not None], server_user())
    return OffsiteRestoreResult(
        backup_id=backup.id,
        target=target.describe(),
        destination=str(destination),
        kept=str(kept) if kept else None,
        seconds=round(time.monotonic() - started, 3),
        wal=wal,
        recovery_dir=str(recovery_dir) if recovery_dir else None,
        staged_wal_files=staged,
    )
