"""Manifests: the JSON record beside every dump, and the only thing that makes a dump a backup.

A dump counts as a backup only when a manifest with ``status: ok`` names it. Manifests are
written to a temporary name, fsynced, renamed and the directory fsynced, so a crash leaves
either the old manifest or the new one, never half of one. Files whose names this module did
not produce, and manifests of other databases, are never returned for deletion.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1
# A backup is a full copy of the database, password hashes included: owner-only.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PRIVATE_UMASK = 0o077
MANIFEST_SUFFIX = ".json"
TEMP_PREFIX = ".dbops-tmp-"  # every temporary name this package writes starts with this
ID_PATTERN = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
STATUS_OK, STATUS_FAILED = "ok", "failed"
_CHUNK = 1 << 20


def new_backup_id(now: datetime | None = None) -> str:
    """A sortable UTC timestamp plus a short random part: ``20261126T030000Z-3fa9c1``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


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
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["verifications"] = [Verification(**v) for v in data.get("verifications", [])]
        return cls(**values)


class BackupDirectory:
    """The backup directory, seen through the manifests this package wrote.

    With ``cache=True`` a manifest is parsed again only when its file changes (manifests are
    replaced, never edited in place, so inode, mtime and size tell). The sidecar lists the
    directory on every scrape, and a manifest holds a row count per table: without the cache,
    scrape time grew with tables times retained backups. Cached manifests are shared between
    calls; such a directory is for reading only.
    """

    def __init__(self, root: Path, *, cache: bool = False) -> None:
        self.root = root
        self._cache: dict[str, tuple[tuple[int, int, int], Manifest | None]] | None = (
            {} if cache else None
        )

    def manifest_path(self, backup_id: str) -> Path:
        return self.root / f"{backup_id}{MANIFEST_SUFFIX}"

    def data_path(self, manifest: Manifest) -> Path:
        assert manifest.path is not None
        return self.root / manifest.path

    def temp_path(self, name: str) -> Path:
        return self.root / f"{TEMP_PREFIX}{name}"

    def manifests(self) -> list[Manifest]:
        """Every readable manifest of ours, oldest first; unreadable or foreign files skipped."""
        found: list[Manifest] = []
        if not self.root.is_dir():
            return found
        seen: set[str] = set()
        for entry in self.root.iterdir():
            name = entry.name
            if not name.endswith(MANIFEST_SUFFIX) or not ID_PATTERN.match(name[:-5]):
                continue
            seen.add(name)
            manifest = self._read_cached(entry)
            if manifest is not None and manifest.id == name[:-5]:
                found.append(manifest)
        if self._cache is not None:
            for gone in set(self._cache) - seen:
                del self._cache[gone]
        found.sort(key=lambda m: (m.started, m.id))
        return found

    def _read_cached(self, path: Path) -> Manifest | None:
        if self._cache is None:
            return self._read(path)
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(path.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        manifest = self._read(path)
        self._cache[path.name] = (key, manifest)
        return manifest

    def backups(self, database: str, manifests: list[Manifest] | None = None) -> list[Manifest]:
        """Good backups of ``database`` whose data is present, oldest first (of ``manifests``
        when the caller has listed them already)."""
        return [
            m
            for m in (self.manifests() if manifests is None else manifests)
            if m.ok and m.database == database and m.path and self.data_path(m).exists()
        ]

    def get(self, backup_id: str) -> Manifest | None:
        if not ID_PATTERN.match(backup_id):
            return None
        path = self.manifest_path(backup_id)
        return self._read(path) if path.exists() else None

    @staticmethod
    def _read(path: Path) -> Manifest | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("tool") != "dbops":
                return None
            manifest = Manifest.from_dict(data)
            # Every reader sorts and buckets by these; a hand-edited bad value skips the file
            # instead of breaking every listing and scrape.
            _ = manifest.started, manifest.finished
            return manifest
        except (OSError, ValueError, TypeError):
            return None

    def write(self, manifest: Manifest) -> None:
        """Atomically: temporary file, fsync, rename, fsync of the directory."""
        temp = self.temp_path(f"{manifest.id}{MANIFEST_SUFFIX}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
            with open(fd, "w", encoding="utf-8") as handle:
                handle.write(manifest.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.manifest_path(manifest.id))
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        fsync_directory(self.root)

    def delete(self, manifest: Manifest) -> None:
        """Manifest first, so the backup stops existing before its data goes."""
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(manifest.id).unlink()
        fsync_directory(self.root)
        if manifest.path:
            data = self.data_path(manifest)
            if data.exists():
                doomed = self.temp_path(f"{manifest.path}.deleting")
                os.replace(data, doomed)
                remove_path(doomed)

    def remove_temporaries(self) -> list[str]:
        """Leftovers of interrupted runs (only our own temporary names). Call under the lock."""
        removed = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.name.startswith(TEMP_PREFIX):
                    remove_path(entry)
                    removed.append(entry.name)
        return removed


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
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
    it is still hashed under its temporary one).
    """
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file():
                yield child.relative_to(path).as_posix(), child
    else:
        yield name or path.name, path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
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
    return sum(file.stat().st_size for _, file in dump_files(path))
