"""Manifests: the JSON record beside every dump, and the only thing that makes a dump a backup.

A dump counts as a backup only when a manifest with ``status: ok`` names it. Manifests are
written to a temporary name, fsynced, renamed and the directory fsynced, so a crash leaves
either the old manifest or the new one, never half of one. Files whose names this module did
not produce, and manifests of other databases, are never returned for deletion.

The directory is a trust boundary. Every name this module opens, writes or deletes is derived
from a backup id (``ID_PATTERN``) and lies directly inside ``BACKUP_DIR``; what a manifest says
about paths is checked against that (:mod:`ops.backup.schema`), never followed. Entries are
opened with ``O_NOFOLLOW`` and removed without following links: a symbolic link planted in the
directory is refused when read and removed as a link, never through it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ops.backup.schema import MANIFEST_VERSION, ManifestInvalid, data_name, parse_time, validate

log = logging.getLogger(__name__)

# A backup is a full copy of the database, password hashes included: owner-only.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PRIVATE_UMASK = 0o077
MANIFEST_SUFFIX = ".json"
TEMP_PREFIX = ".dbops-tmp-"  # every temporary name this package writes starts with this
ID_PATTERN = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
STATUS_OK, STATUS_FAILED = "ok", "failed"
_CHUNK = 1 << 20
# Far more than a manifest with a row count for each of 100,000 tables; a bigger file, or
# /dev/zero behind a name, is refused instead of read until memory runs out.
MANIFEST_MAX_BYTES = 64 << 20
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO never hangs us

__all__ = ["MANIFEST_VERSION", "ManifestInvalid", "data_name", "parse_time"]


def new_backup_id(now: datetime | None = None) -> str:
    """A sortable UTC timestamp plus a short random part: ``20261126T030000Z-3fa9c1``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds") if moment else None


@dataclass
class Verification:
    """One check of a backup: ``kind`` is ``checksum`` (sha256 + ``pg_restore --list``) or
    ``drill`` (restored into a scratch database and row counts compared)."""

    kind: str
    ok: bool
    at: str
    duration_seconds: float
    detail: str = ""


@dataclass
class Manifest:
    id: str
    database: str
    format: str
    compression: str
    status: str
    started_at: str
    finished_at: str | None = None
    duration_seconds: float | None = None
    size_bytes: int = 0
    path: str | None = None  # the dump's name inside the backup directory
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    tables: dict[str, int] = field(default_factory=dict)  # schema.table -> rows at dump time
    server_version: str | None = None
    pg_dump_version: str | None = None
    error: str | None = None
    verifications: list[Verification] = field(default_factory=list)
    tool: str = "dbops"
    manifest_version: int = MANIFEST_VERSION

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def started(self) -> datetime:
        moment = parse_time(self.started_at)
        if moment is None:
            raise ValueError(f"manifest {self.id} has no started_at")
        return moment

    @property
    def finished(self) -> datetime | None:
        return parse_time(self.finished_at)

    def last_verification(self, kind: str | None = None) -> Verification | None:
        matching = [v for v in self.verifications if kind is None or v.kind == kind]
        return matching[-1] if matching else None

    def last_success(self, kind: str | None = None) -> datetime | None:
        moments = [parse_time(v.at) for v in self.verifications if v.ok and kind in (None, v.kind)]
        return max((m for m in moments if m is not None), default=None)

    @property
    def verified(self) -> bool:
        """The latest check passed (a later failed check revokes an earlier success)."""
        latest = self.last_verification()
        return latest is not None and latest.ok

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """From data :func:`ops.backup.schema.validate` accepted."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["verifications"] = [Verification(**v) for v in data.get("verifications", [])]
        return cls(**values)


class BackupDirError(OSError):
    """``BACKUP_DIR`` itself is unusable (missing, not a directory, unreadable): one line."""

    def __init__(self, root: Path, code: int, reason: str) -> None:
        super().__init__(code, reason, str(root))
        self.root = root

    def __str__(self) -> str:
        return f"BACKUP_DIR {self.root}: {self.strerror}"


class UnsafeEntry(OSError):
    """An entry of the backup directory that is not what its name says (a symbolic link, a
    FIFO, a hard link to elsewhere): refused rather than followed."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(errno.ELOOP, reason, str(path))
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.strerror}"


def dir_error(root: Path, exc: OSError) -> BackupDirError:
    reasons = {
        errno.ENOENT: "does not exist",
        errno.ENOTDIR: "is not a directory",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }
    code = exc.errno or errno.EIO
    return BackupDirError(root, code, reasons.get(code, exc.strerror or str(exc)))


@contextlib.contextmanager
def _open_regular_file(path: Path) -> Iterator[io.FileIO]:
    """``path`` open for reading, never through a symbolic link, and only if it is a regular
    file (:class:`UnsafeEntry` otherwise)."""
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeEntry(path, "is a symbolic link; not followed") from None
        raise
    with open(fd, "rb", buffering=0) as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeEntry(path, "is not a regular file")
        yield handle


def read_plain_file(path: Path, limit: int = MANIFEST_MAX_BYTES) -> bytes:
    """The content of a regular file, never through a symbolic link and at most ``limit``."""
    with _open_regular_file(path) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UnsafeEntry(path, f"is larger than {limit} bytes")
    return data


def parse_manifest(content: bytes, name: str) -> Manifest:
    """A manifest from the bytes of ``<id>.json``; :class:`ManifestInvalid` says what is wrong."""
    backup_id = name.removesuffix(MANIFEST_SUFFIX)
    try:
        data = json.loads(content.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ManifestInvalid(None, "not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ManifestInvalid(None, f"line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # NaN, 5,000-digit integers, deep nesting
        raise ManifestInvalid(None, f"not valid JSON ({str(exc)[:80]})") from None
    return Manifest.from_dict(validate(data, backup_id))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class BackupDirectory:
    """The backup directory, seen through the manifests this package wrote.

    With ``cache=True`` a manifest is parsed again only when its file changes (manifests are
    replaced, never edited in place, so inode, mtime and size tell). The sidecar lists the
    directory on every scrape, and a manifest holds a row count per table: without the cache,
    scrape time grew with tables times retained backups. Cached manifests are shared between
    calls; such a directory is for reading only.

    ``invalid`` maps each manifest (or dump) the last listing skipped to why; each is logged
    once per instance and file version, not on every listing.
    """

    def __init__(self, root: Path, *, cache: bool = False) -> None:
        self.root = root
        self._cache: dict[str, tuple[tuple[int, int, int], Manifest | ManifestInvalid]] | None = (
            {} if cache else None
        )
        self._warned: set[tuple[str, object]] = set()
        self.invalid: dict[str, str] = {}

    def manifest_path(self, backup_id: str) -> Path:
        return self.root / f"{_checked_id(backup_id)}{MANIFEST_SUFFIX}"

    def data_path(self, manifest: Manifest) -> Path:
        """Derived from the id and format alone; ``manifest.path`` is checked, never used."""
        return self.root / data_name(_checked_id(manifest.id), manifest.format)

    def temp_path(self, name: str) -> Path:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a plain name: {name!r}")
        return self.root / f"{TEMP_PREFIX}{name}"

    def check(self) -> None:
        """:class:`BackupDirError` unless the directory can be listed."""
        self._entries()

    def _entries(self) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(self.root) as entries:
                return list(entries)
        except OSError as exc:
            raise dir_error(self.root, exc) from None

    def manifests(self) -> list[Manifest]:
        """Every valid manifest of ours, oldest first; invalid ones skipped with a warning.

        :class:`BackupDirError` when the directory itself cannot be listed: an empty answer
        would read as "no backups".
        """
        found: list[Manifest] = []
        seen: set[str] = set()
        self.invalid = {}
        for entry in self._entries():
            name = entry.name
            if not name.endswith(MANIFEST_SUFFIX) or not ID_PATTERN.match(name[:-5]):
                continue
            seen.add(name)
            manifest = self._load(name)
            if isinstance(manifest, Manifest):
                found.append(manifest)
        if self._cache is not None:
            for gone in set(self._cache) - seen:
                del self._cache[gone]
        found.sort(key=lambda m: (m.started, m.id))
        return found

    def _load(self, name: str) -> Manifest | ManifestInvalid | None:
        path = self.root / name
        try:
            info = path.lstat()
        except FileNotFoundError:
            return None  # deleted while we listed
        except OSError as exc:
            return self._invalid(name, None, ManifestInvalid(None, exc.strerror or str(exc)))
        key = (info.st_ino, info.st_mtime_ns, info.st_size)
        cached = self._cache.get(name) if self._cache is not None else None
        result: Manifest | ManifestInvalid | None
        if cached is not None and cached[0] == key:
            result = cached[1]
        else:
            result = self._parse(path)
            if self._cache is not None and result is not None:
                self._cache[name] = (key, result)
        if isinstance(result, ManifestInvalid):
            return self._invalid(name, key, result)
        return result

    def _parse(self, path: Path) -> Manifest | ManifestInvalid | None:
        try:
            return parse_manifest(read_plain_file(path), path.name)
        except FileNotFoundError:
            return None
        except UnsafeEntry as exc:
            return ManifestInvalid(None, exc.strerror or "unsafe")
        except OSError as exc:
            return ManifestInvalid(None, f"unreadable: {exc.strerror or exc}")
        except ManifestInvalid as exc:
            return exc

    def _invalid(self, name: str, key: object, problem: ManifestInvalid) -> ManifestInvalid:
        self.invalid[name] = str(problem)
        if (name, key) not in self._warned:
            self._warned.add((name, key))
            log.warning("%s: %s; skipped", self.root / name, problem)
        return problem

    def backups(self, database: str, manifests: list[Manifest] | None = None) -> list[Manifest]:
        """Good backups of ``database`` whose data is present, oldest first (of ``manifests``
        when the caller has listed them already). A dump that is a symbolic link or otherwise
        not what its manifest says is skipped with a warning, like an invalid manifest."""
        good = []
        for manifest in self.manifests() if manifests is None else manifests:
            if not (manifest.ok and manifest.database == database and manifest.path):
                continue
            problem = self.data_problem(manifest)
            if problem is None:
                good.append(manifest)
            elif problem != "missing":
                name = data_name(manifest.id, manifest.format)
                self._invalid(name, problem, ManifestInvalid(None, problem))
        return good

    def data_problem(self, manifest: Manifest) -> str | None:
        """Why the dump of ``manifest`` is unusable ("missing", a link...), ``None`` if fine."""
        try:
            info = self.data_path(manifest).lstat()
        except FileNotFoundError:
            return "missing"
        except OSError as exc:
            return f"unreadable: {exc.strerror or exc}"
        if stat.S_ISLNK(info.st_mode):
            return "is a symbolic link; not followed"
        wanted = stat.S_ISDIR if manifest.format == "directory" else stat.S_ISREG
        if not wanted(info.st_mode):
            return "is not a directory" if manifest.format == "directory" else "is not a file"
        return None

    def load(self, backup_id: str) -> Manifest | None:
        """The manifest of ``backup_id``; ``None`` if there is none, :class:`ManifestInvalid`
        (or :class:`UnsafeEntry`) if there is one that cannot be trusted."""
        if not ID_PATTERN.match(backup_id):
            return None
        path = self.manifest_path(backup_id)
        try:
            content = read_plain_file(path)
        except FileNotFoundError:
            return None
        return parse_manifest(content, path.name)

    def get(self, backup_id: str) -> Manifest | None:
        """Like :meth:`load`, with an invalid manifest logged and treated as absent."""
        try:
            return self.load(backup_id)
        except (ManifestInvalid, OSError) as problem:
            log.warning("%s: %s; skipped", self.root / f"{backup_id}{MANIFEST_SUFFIX}", problem)
            return None

    def write(self, manifest: Manifest) -> None:
        """Atomically: a new temporary file (never an existing name, so never through a planted
        link), fsync, rename over the manifest's name, fsync of the directory."""
        target = self.manifest_path(manifest.id)
        temp = self.temp_path(f"{manifest.id}{MANIFEST_SUFFIX}.{secrets.token_hex(4)}")
        try:
            fd = os.open(
                temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, PRIVATE_FILE_MODE
            )
            with open(fd, "w", encoding="utf-8") as handle:
                handle.write(manifest.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)  # replaces a link planted at ``target``, never its target
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        fsync_directory(self.root)

    def delete(self, manifest: Manifest, *, data: bool = True) -> None:
        """Manifest first, so the backup stops existing before its data goes. The data is the
        name the id implies, removed without following links."""
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(manifest.id).unlink()
        fsync_directory(self.root)
        if data and manifest.path:
            name = data_name(manifest.id, manifest.format)
            dump = self.root / name
            try:
                info = dump.lstat()
            except FileNotFoundError:
                return
            if stat.S_ISDIR(info.st_mode):
                doomed = self.temp_path(f"{name}.{secrets.token_hex(4)}.deleting")
                os.replace(dump, doomed)
                remove_path(doomed)
            else:
                with contextlib.suppress(FileNotFoundError):
                    dump.unlink()

    def remove_temporaries(self) -> list[str]:
        """Leftovers of interrupted runs (only our own temporary names). Call under the run
        lock: a live pg_dump inherits that lock (see :mod:`ops.backup.runner`), so the lock is
        free only when no child of an earlier run can still be writing."""
        removed = []
        for entry in self._entries():
            if entry.name.startswith(TEMP_PREFIX):
                remove_path(self.root / entry.name)
                removed.append(entry.name)
        return removed


def _checked_id(backup_id: str) -> str:
    if not isinstance(backup_id, str) or not ID_PATTERN.match(backup_id):
        raise ValueError(f"not a backup id: {backup_id!r}")
    return backup_id


def remove_path(path: Path) -> None:
    """Remove a file, a link (as a link) or a directory tree; never follows a link, so nothing
    outside ``path`` is touched (``shutil.rmtree`` works through file descriptors on Linux)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dump_files(path: Path, name: str | None = None) -> Iterator[tuple[str, Path]]:
    """``(relative name, path)`` of every file of a dump: the file itself, or a directory's.

    ``name`` is what a single-file dump is called in the manifest (its published name, while
    it is still hashed under its temporary one). A directory dump is flat; what is in it is
    listed without following links (:func:`sha256_file` then refuses anything not a file).
    """
    if path.is_dir() and not path.is_symlink():
        with os.scandir(path) as entries:
            names = sorted(entry.name for entry in entries)
        for child in names:
            yield child, path / child
    else:
        yield name or path.name, path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with _open_regular_file(path) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_dump(path: Path, jobs: int = 1, name: str | None = None) -> dict[str, str]:
    """sha256 of every file of a dump; hashlib releases the GIL, so threads hash in parallel."""
    entries = list(dump_files(path, name))
    if jobs <= 1 or len(entries) <= 1:
        return {name: sha256_file(file) for name, file in entries}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        digests = pool.map(sha256_file, [file for _, file in entries])
        return dict(zip([name for name, _ in entries], digests, strict=True))


def dump_size(path: Path) -> int:
    return sum(file.lstat().st_size for _, file in dump_files(path))
