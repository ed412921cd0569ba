"""Verified logical dumps, copied off host with boto3 under ``<prefix>/dumps/<database>/``.

What is copied: a backup whose manifest records that its latest verification passed (see
:attr:`ops.backup.manifest.Manifest.verified`), as soon as the sidecar's drill passes, and by a
periodic catch-up scan of the backup directory for verified backups not yet shipped. Each is
queued on the sidecar's volume (:mod:`ops.offsite.dumpqueue`) and shipped oldest first: the
dump's file(s), then the manifest last, so a listing of the store never shows a manifest whose
data is missing. Every upload carries a checksum the store checks (SHA-256 through the SDK's
flexible checksums for data, ``Content-MD5`` for the manifest), the sizes are compared after
upload and the manifest is read back and compared byte for byte.

A failure leaves the backup queued; the next attempt waits 30 s, doubling to at most an hour,
and nothing queued behind it ships before it. Local backups never wait for the store: shipping
runs in its own job and only holds a backup's read lock (so retention cannot delete it mid-copy).

Nothing here follows a path from a manifest: names are derived from the backup id and format,
and the manifest is read through the schema validation of :mod:`ops.backup.manifest`.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast
from urllib.parse import quote

from ops.backup.lock import LockHeld, reading
from ops.backup.manifest import (
    MANIFEST_SUFFIX,
    BackupDirectory,
    Manifest,
    ManifestInvalid,
    UnsafeEntry,
    data_name,
    dump_files,
    parse_manifest,
    read_plain_file,
)
from ops.backup.verify import checksum_problems
from ops.offsite.dumpqueue import DumpQueue, QueueState, backoff
from ops.offsite.settings import DUMPS_PREFIX, OffsiteSettings
from ops.offsite.store import StoreError, classify, client
from ops.settings import Settings

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from botocore.client import BaseClient

log = logging.getLogger(__name__)

OnFailure = Callable[[str], None]  # called with StoreError.kind for each failed attempt
MULTIPART_THRESHOLD = 64 << 20  # bigger files go up in parts...
MULTIPART_CHUNK = 16 << 20  # ...of this size, at most MAX_CONCURRENCY in memory at once
MAX_CONCURRENCY = 2
META_BACKUP, META_SHA256 = "dbops-backup", "dbops-sha256"  # x-amz-meta-* on every data object


def transfer_config(
    threshold: int = MULTIPART_THRESHOLD, chunk: int = MULTIPART_CHUNK
) -> TransferConfig:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(
        multipart_threshold=threshold,
        multipart_chunksize=chunk,
        max_concurrency=MAX_CONCURRENCY,
        use_threads=True,
        preferred_transfer_client="classic",  # the s3transfer limits below, never the CRT's
    )
    # Parts read from a file object wait in memory: at most this many (s3transfer's default
    # is 10), so an upload holds about (MAX_CONCURRENCY + 1) chunks whatever the dump's size.
    config.max_in_memory_upload_chunks = MAX_CONCURRENCY + 1
    return config


def database_folder(offsite: OffsiteSettings, database: str) -> str:
    """``<prefix>/dumps/<database>`` with the name percent-encoded, so no database name can
    add a level or climb one ('/' and a name of dots are encoded)."""
    segment = quote(database, safe="")
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    return offsite.key(DUMPS_PREFIX, segment)


def manifest_key(offsite: OffsiteSettings, database: str, backup_id: str) -> str:
    return f"{database_folder(offsite, database)}/{backup_id}{MANIFEST_SUFFIX}"


def data_keys(offsite: OffsiteSettings, manifest: Manifest) -> list[tuple[str, str]]:
    """``(name in the manifest's files, object key)`` of every data object of a backup; the
    names come from the id and format, and a directory dump's file names were checked by the
    manifest's schema (plain names only)."""
    folder = database_folder(offsite, manifest.database)
    name = data_name(manifest.id, manifest.format)
    if manifest.format == "custom":
        return [(name, f"{folder}/{name}")]
    return [(file, f"{folder}/{name}/{file}") for file in sorted(manifest.files)]


class LocalUnavailable(Exception):
    """The local backup cannot be shipped (deleted, damaged, no longer verified)."""


class Busy(Exception):
    """Retention holds the backup, or the backup directory cannot be read right now: the
    backup keeps its place and is tried again on the next run."""


@dataclass
class ShipReport:
    shipped: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # id -> why it left the queue unshipped
    error: StoreError | None = None
    waiting: int = 0  # still queued afterwards
    deferred_until: float | None = None  # in backoff: no attempt before this


@dataclass(frozen=True)
class DumpShipping:
    """What the metrics read: the queue and the newest successful copy."""

    queued_files: int
    queued_bytes: int
    last_shipped: float | None


def shipping_state(offsite: OffsiteSettings) -> DumpShipping:
    """From the queue on disk; cheap (one small file), no store call."""
    state = DumpQueue(offsite.directory).read()
    return DumpShipping(
        queued_files=len(state.pending),
        queued_bytes=sum(p.bytes for p in state.pending),
        last_shipped=state.last_shipped,
    )


def enqueue(settings: Settings, manifest: Manifest) -> bool:
    """Queue ``manifest``'s backup if it is a verified good backup not yet shipped."""
    if not (manifest.ok and manifest.verified):
        return False
    with DumpQueue(settings.offsite.directory).update() as state:
        added = state.add(manifest.id, manifest.database, manifest.size_bytes, time.time())
    if added:
        log.info("backup %s queued for the off-host store", manifest.id)
    return added


def catch_up(settings: Settings, store: BackupDirectory | None = None) -> list[str]:
    """Queue every verified local backup that is neither shipped nor queued; forget shipped
    ids that are no longer in the backup directory (the record stays bounded). The sidecar
    passes its ``store`` with the manifest cache, since it scans every minute."""
    store = store if store is not None else BackupDirectory(settings.backup.directory)
    manifests = store.manifests()
    backups = store.backups(settings.db.database, manifests)
    added = []
    now = time.time()
    with DumpQueue(settings.offsite.directory).update() as state:
        local = {m.id for m in manifests}
        state.shipped = {i: t for i, t in state.shipped.items() if i in local}
        for manifest in backups:
            if manifest.verified and state.add(
                manifest.id,
                manifest.database,
                manifest.size_bytes,
                now,
                manifest.started.timestamp(),
            ):
                added.append(manifest.id)
    if added:
        log.info("catch-up queued %d verified backup(s) for the off-host store", len(added))
    return added


_shipping = threading.Lock()


def ship_pending(
    settings: Settings,
    *,
    on_failure: OnFailure | None = None,
    s3: BaseClient | None = None,
    transfer: TransferConfig | None = None,
    cancel: threading.Event | None = None,
    ignore_backoff: bool = False,
) -> ShipReport:
    """Ship the queue in order until it is empty or the store fails; one run at a time."""
    report = ShipReport()
    queue = DumpQueue(settings.offsite.directory)
    if not _shipping.acquire(blocking=False):
        report.waiting = len(queue.read().pending)
        return report
    try:
        state = queue.read()
        now = time.time()
        if state.next_attempt is not None and now < state.next_attempt and not ignore_backoff:
            report.waiting, report.deferred_until = len(state.pending), state.next_attempt
            return report
        if not state.pending:
            return report
        s3 = s3 if s3 is not None else client(settings.offsite)
        transfer = transfer if transfer is not None else transfer_config()
        for entry in list(state.pending):
            if cancel is not None and cancel.is_set():
                break
            try:
                ship_one(settings, s3, entry.id, transfer)
            except LocalUnavailable as gone:
                report.dropped[entry.id] = str(gone)
                log.error("backup %s not shipped off host: %s", entry.id, gone)
                with queue.update() as current:
                    current.remove(entry.id)
                continue
            except Busy as busy:
                log.warning("backup %s not shipped this time: %s", entry.id, busy)
                break  # keep the order: nothing behind it goes first
            except StoreError as error:
                report.error = error
                _failed(queue, error, on_failure)
                break
            report.shipped.append(entry.id)
            with queue.update() as current:
                _shipped(current, entry.id, time.time())
            log.info("backup %s shipped to the off-host store", entry.id)
        final = queue.read()
        report.waiting, report.deferred_until = len(final.pending), final.next_attempt
        return report
    finally:
        _shipping.release()


def _shipped(state: QueueState, backup_id: str, now: float) -> None:
    state.remove(backup_id)
    state.shipped[backup_id] = now
    state.last_shipped = now
    state.failures, state.next_attempt, state.last_error = 0, None, None


def _failed(queue: DumpQueue, error: StoreError, on_failure: OnFailure | None) -> None:
    with queue.update() as state:
        state.failures += 1
        delay = backoff(state.failures)
        state.next_attempt = time.time() + delay
        state.last_error = str(error)
        waiting = len(state.pending)
    log.error(
        "off-host dump copy failed (%s): %s; %d backup(s) stay queued, next attempt in %.0fs",
        error.kind,
        error,
        waiting,
        delay,
    )
    if on_failure is not None:
        try:
            on_failure(error.kind)
        except Exception:
            log.exception("upload failure callback failed")


def ship_one(settings: Settings, s3: BaseClient, backup_id: str, transfer: TransferConfig) -> None:
    """Data then manifest of one local backup; :class:`StoreError` for anything the store did,
    :class:`LocalUnavailable` when the backup itself cannot be shipped."""
    store = BackupDirectory(settings.backup.directory)
    try:
        with reading(store, backup_id, wait=0.0):
            content, manifest = _local_manifest(store, backup_id)
            problems = checksum_problems(store, manifest)
            if problems:
                raise LocalUnavailable(f"damaged locally: {'; '.join(problems[:3])}")
            _upload(settings, s3, store, manifest, content, transfer)
    except LockHeld as held:
        raise Busy(str(held)) from None
    except (UnsafeEntry, ManifestInvalid) as problem:
        raise LocalUnavailable(str(problem)) from None
    except OSError as problem:  # EIO, EACCES...: maybe passing; the backup keeps its place
        raise Busy(f"{problem.filename or store.root}: {problem.strerror}") from None


def _local_manifest(store: BackupDirectory, backup_id: str) -> tuple[bytes, Manifest]:
    try:
        content = read_plain_file(store.manifest_path(backup_id))
    except FileNotFoundError:
        raise LocalUnavailable("deleted from the backup directory before it was shipped") from None
    manifest = parse_manifest(content, f"{backup_id}{MANIFEST_SUFFIX}")
    if not (manifest.ok and manifest.verified):
        raise LocalUnavailable("its latest verification no longer passes")
    if store.data_problem(manifest) == "missing":
        raise LocalUnavailable("its dump was deleted before it was shipped")
    return content, manifest


def _upload(
    settings: Settings,
    s3: BaseClient,
    store: BackupDirectory,
    manifest: Manifest,
    content: bytes,
    transfer: TransferConfig,
) -> None:
    offsite = settings.offsite
    local = dict(dump_files(store.data_path(manifest), data_name(manifest.id, manifest.format)))
    with store_errors(offsite):
        for name, key in data_keys(offsite, manifest):
            digest = manifest.files[name]
            # Opened once, never through a link (a name swapped for a link to a secret file
            # after the checksum is not followed), and read from that descriptor only.
            with _open_plain(local[name]) as handle:
                size = os.fstat(handle.fileno()).st_size
                s3.upload_fileobj(
                    handle,
                    offsite.bucket,
                    key,
                    ExtraArgs={
                        "Metadata": {META_BACKUP: manifest.id, META_SHA256: digest},
                        "ChecksumAlgorithm": "SHA256",
                    },
                    Config=transfer,
                )
            head = s3.head_object(Bucket=offsite.bucket, Key=key)
            if int(head.get("ContentLength", -1)) != size or (
                head.get("Metadata", {}).get(META_SHA256) != digest
            ):
                raise StoreError(
                    "other", f"{key}: the stored copy does not match ({size} bytes sent)"
                )
        key = manifest_key(offsite, manifest.database, manifest.id)
        md5 = base64.b64encode(hashlib.md5(content, usedforsecurity=False).digest()).decode()
        s3.put_object(
            Bucket=offsite.bucket,
            Key=key,
            Body=content,
            ContentMD5=md5,
            ContentType="application/json",
            Metadata={META_BACKUP: manifest.id},
        )
        stored = s3.get_object(Bucket=offsite.bucket, Key=key)["Body"].read(len(content) + 1)
        if hashlib.sha256(stored).digest() != hashlib.sha256(content).digest():
            raise StoreError("other", f"{key}: the stored manifest does not match what was sent")


def _open_plain(path: Path) -> BinaryIO:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LocalUnavailable(f"{path.name} is a symbolic link; not followed") from None
        raise
    handle = open(fd, "rb")  # noqa: SIM115 - closed by the caller's with
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        raise LocalUnavailable(f"{path.name} is not a regular file")
    return handle


def root_cause(error: BaseException) -> BaseException:
    """The botocore error inside boto3's transfer errors (S3UploadFailedError and friends)."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ClientError | BotoCoreError):
            return cast(BaseException, current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return error


@contextlib.contextmanager
def store_errors(offsite: OffsiteSettings) -> Iterator[None]:
    """boto3's exceptions (also those the transfer manager wraps) as one-line StoreErrors."""
    try:
        yield
    except Exception as error:
        cause = root_cause(error)
        if cause is error and not type(error).__module__.startswith(("boto3", "botocore")):
            raise  # ours (StoreError, a refused object) or local (an OSError of a file)
        raise classify(cause, offsite) from None
