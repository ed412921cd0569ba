"""Reading dumps back from the store: the listing, and a download checked before use.

An object in the store is data, like a file in ``BACKUP_DIR``: whoever can write the bucket can
plant one. A manifest is read at most ``MANIFEST_MAX_BYTES`` and must pass the same schema as a
local one (its id equal to its key's name, its files the names the id implies, the database the
folder's); the data objects fetched are only those names, each no larger than the manifest says
the whole dump is, written into a private directory this module creates, and hashed as they
arrive. Only a download whose every file matches the manifest's SHA-256 is handed to the
restore path (:mod:`ops.backup.restore`), which checks the checksums once more itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ops.backup.manifest import (
    ID_PATTERN,
    MANIFEST_MAX_BYTES,
    MANIFEST_SUFFIX,
    PRIVATE_FILE_MODE,
    BackupDirectory,
    Manifest,
    ManifestInvalid,
    data_name,
    parse_manifest,
)
from ops.hints import spell
from ops.offsite.dumps import data_keys, database_folder, manifest_key, store_errors
from ops.offsite.store import StoreError, client, listed_objects
from ops.settings import Settings

if TYPE_CHECKING:
    from botocore.client import BaseClient

log = logging.getLogger(__name__)

STAGING_PREFIX = ".dbops-offsite-restore-"  # not a TEMP_PREFIX name: a backup run leaves it be
STAGING_LOCK = ".in-use"
STALE_AFTER = 86400.0  # an unlocked staging directory this old is a killed restore's leftover
_CHUNK = 1 << 20


class FetchError(Exception):
    """A dump in the store that cannot be used (missing, refused, damaged): one line."""


def offsite_backups(
    settings: Settings, s3: BaseClient | None = None
) -> tuple[list[Manifest], dict[str, str]]:
    """Good backups of the configured database in the store, oldest first, and the manifests
    skipped with why (``key -> reason``)."""
    offsite = settings.offsite
    s3 = s3 if s3 is not None else client(offsite)
    folder = database_folder(offsite, settings.db.database) + "/"
    found: list[Manifest] = []
    invalid: dict[str, str] = {}
    with store_errors(offsite):
        for key, _ in listed_objects(offsite, folder, s3=s3, delimiter="/"):
            name = key[len(folder) :]
            if not name.endswith(MANIFEST_SUFFIX) or not ID_PATTERN.match(name[:-5]):
                continue
            try:
                manifest = read_manifest(settings, s3, name[:-5])
            except FetchError as problem:
                invalid[key] = str(problem)
                continue
            if manifest is not None and manifest.ok:
                found.append(manifest)
    found.sort(key=lambda m: (m.started, m.id))
    return found, invalid


def read_manifest(settings: Settings, s3: BaseClient, backup_id: str) -> Manifest | None:
    """The manifest of ``backup_id`` in the store, validated; ``None`` if there is none."""
    offsite = settings.offsite
    key = manifest_key(offsite, settings.db.database, backup_id)
    from botocore.exceptions import ClientError

    try:
        with store_errors(offsite):
            try:
                answer = s3.get_object(Bucket=offsite.bucket, Key=key)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            if int(answer.get("ContentLength", 0)) > MANIFEST_MAX_BYTES:
                answer["Body"].close()
                raise FetchError(f"{key}: larger than {MANIFEST_MAX_BYTES} bytes")
            content = answer["Body"].read(MANIFEST_MAX_BYTES + 1)
    except StoreError:
        raise
    if len(content) > MANIFEST_MAX_BYTES:
        raise FetchError(f"{key}: larger than {MANIFEST_MAX_BYTES} bytes")
    try:
        manifest = parse_manifest(content, f"{backup_id}{MANIFEST_SUFFIX}")
    except ManifestInvalid as invalid:
        raise FetchError(f"{key}: {invalid}") from None
    if manifest.database != settings.db.database:
        raise FetchError(f"{key}: field database: not the database of its folder")
    if not manifest.ok:
        raise FetchError(f"{key}: a failed run, not a backup")
    return manifest


def download(settings: Settings, s3: BaseClient, manifest: Manifest, into: Path) -> None:
    """The dump's objects into ``into`` under the name its id implies, each hashed as it
    arrives and compared with the manifest; nothing larger than the manifest's size."""
    offsite = settings.offsite
    target = into / data_name(manifest.id, manifest.format)
    if manifest.format == "directory":
        target.mkdir(mode=0o700)
    if not manifest.files:
        raise FetchError(f"backup {manifest.id}: its manifest lists no files")
    budget = manifest.size_bytes
    free = shutil.disk_usage(into).free
    if budget > free:  # a manifest's size is data too: it does not get to fill the disk
        raise FetchError(
            f"backup {manifest.id} is {budget} bytes, more than the {free} free in {into.parent}"
        )
    for name, key in data_keys(offsite, manifest):
        path = target if manifest.format == "custom" else target / name
        budget -= _fetch(settings, s3, key, path, manifest.files.get(name), budget)


def _fetch(
    settings: Settings, s3: BaseClient, key: str, path: Path, digest: str | None, budget: int
) -> int:
    offsite = settings.offsite
    if digest is None:
        raise FetchError(f"{key}: not in its manifest's files")
    from botocore.exceptions import ClientError

    with store_errors(offsite):
        try:
            answer = s3.get_object(Bucket=offsite.bucket, Key=key)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FetchError(f"{key}: missing from the store") from None
            raise
        length = int(answer.get("ContentLength", 0))
        if length > budget:
            answer["Body"].close()
            raise FetchError(f"{key}: {length} bytes, more than its manifest's {budget}")
        hasher = hashlib.sha256()
        received = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
        with open(fd, "wb") as handle:
            body = answer["Body"]
            while chunk := body.read(_CHUNK):
                received += len(chunk)
                if received > budget:
                    raise FetchError(f"{key}: more bytes than its manifest's {budget}")
                hasher.update(chunk)
                handle.write(chunk)
    if received != length:
        raise FetchError(f"{key}: truncated ({received} of {length} bytes)")
    if hasher.hexdigest() != digest:
        raise FetchError(f"{key}: sha256 does not match its manifest")
    return received


@contextlib.contextmanager
def fetched(settings: Settings, backup_id: str) -> Iterator[Settings]:
    """``backup_id`` downloaded and checked into a private staging directory; yields settings
    whose ``BACKUP_DIR`` is that directory, for the ordinary restore path. The directory is
    removed afterwards, whatever happened."""
    if not ID_PATTERN.match(backup_id):
        raise FetchError(
            f"{backup_id!r} is not a backup id ({spell('ops backup list --offsite')} lists them)"
        )
    s3 = client(settings.offsite)
    manifest = read_manifest(settings, s3, backup_id)
    if manifest is None:
        raise FetchError(
            f"no backup {backup_id} of {settings.db.database} in the off-host store "
            f"({spell('ops backup list --offsite')} lists them)"
        )
    staging, lock = _staging_directory(settings)
    try:
        download(settings, s3, manifest, staging)
        BackupDirectory(staging).write(manifest)
        yield replace(settings, backup=replace(settings.backup, directory=staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(lock)


def _staging_directory(settings: Settings) -> tuple[Path, int]:
    """A new private directory inside ``BACKUP_DIR`` when it exists and takes files (the
    space meant for dumps), in the system's temporary directory otherwise (a fresh machine
    with no backups at all); locked while in use, so only leftovers are cleaned up."""
    parent = settings.backup.directory
    if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        parent = Path(tempfile.gettempdir())
    _remove_leftovers(parent)
    path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
    fd = os.open(path / STAGING_LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return path, fd


def _remove_leftovers(parent: Path) -> None:
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            if not entry.name.startswith(STAGING_PREFIX) or entry.is_symlink():
                continue
            try:
                if time.time() - entry.lstat().st_mtime < STALE_AFTER:
                    continue
                fd = os.open(entry / STAGING_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    continue
                fd = None
            try:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(entry, ignore_errors=True)
            except BlockingIOError:
                continue
            finally:
                if fd is not None:
                    os.close(fd)
