"""What a manifest must look like before anything trusts it.

A manifest is data read from a directory that other people and programs can write to; one
hand-edited or planted file must neither break every listing nor steer dbops outside
``BACKUP_DIR``. Each field is checked for its type and range as the manifest is read, and the
names of the dump and its files must be exactly what the backup's id implies: a manifest never
*points* anywhere, it only confirms what the id already says. A manifest that fails is skipped
with one warning naming the file and the field; the others keep working.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

MANIFEST_VERSION = 1
FORMATS = {"custom": ".dump", "directory": ".dir"}
STATUSES = ("ok", "failed")
VERIFICATION_KINDS = ("checksum", "drill")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A file of a directory-format dump: pg_dump writes a flat directory of names such as
# ``toc.dat`` and ``3001.dat.gz``. Nothing with a slash, nothing hidden, no ``..``.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,200}$")


class ManifestInvalid(ValueError):
    """A manifest that does not match the schema; ``field`` names where (``None``: the file)."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(f"field {field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


def data_name(backup_id: str, dump_format: str) -> str:
    """The only name the dump of ``backup_id`` can have inside the backup directory."""
    return f"{backup_id}{FORMATS[dump_format]}"


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def validate(data: object, backup_id: str) -> dict[str, Any]:
    """``data`` (parsed JSON) checked as the manifest of ``backup_id``; the first problem raises
    :class:`ManifestInvalid`. Unknown keys are allowed (a newer dbops may add fields)."""
    if not isinstance(data, dict):
        raise ManifestInvalid(None, "not a JSON object")
    if data.get("tool") != "dbops":
        raise ManifestInvalid("tool", "not written by dbops")
    version = data.get("manifest_version", MANIFEST_VERSION)
    if not _is_int(version) or not 1 <= version <= MANIFEST_VERSION:
        raise ManifestInvalid(
            "manifest_version", f"must be an integer from 1 to {MANIFEST_VERSION}"
        )
    if data.get("id") != backup_id:
        raise ManifestInvalid("id", "must be a string equal to the file's name")
    for key in ("database", "compression"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ManifestInvalid(key, "must be a non-empty string")
    dump_format = data.get("format")
    if dump_format not in FORMATS:
        raise ManifestInvalid("format", f"must be one of {', '.join(FORMATS)}")
    status = data.get("status")
    if status not in STATUSES:
        raise ManifestInvalid("status", f"must be one of {', '.join(STATUSES)}")
    _time(data, "started_at", required=True)
    _time(data, "finished_at", required=False)
    _number(data, "duration_seconds", required=False)
    size = data.get("size_bytes", 0)
    if not _is_int(size) or size < 0:
        raise ManifestInvalid("size_bytes", "must be an integer >= 0")
    for key in ("server_version", "pg_dump_version", "error"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ManifestInvalid(key, "must be a string or null")
    expected = data_name(backup_id, str(dump_format))
    path = data.get("path")
    if path is not None and path != expected:
        raise ManifestInvalid("path", f"must be {expected}, the name its id implies, or null")
    if status == "ok" and path is None:
        raise ManifestInvalid("path", "a good backup must name its dump")
    _files(data.get("files", {}), dump_format, expected)
    _tables(data.get("tables", {}))
    _verifications(data.get("verifications", []))
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _time(data: Mapping[str, Any], key: str, *, required: bool) -> None:
    value = data.get(key)
    if value is None and not required:
        return
    if not isinstance(value, str) or not value:
        raise ManifestInvalid(key, "must be an ISO 8601 timestamp string")
    try:
        moment = parse_time(value)
        assert moment is not None
        moment.timestamp()
    except (ValueError, OverflowError, AssertionError):
        raise ManifestInvalid(key, "is not a valid ISO 8601 timestamp") from None


def _number(data: Mapping[str, Any], key: str, *, required: bool, where: str = "") -> None:
    value = data.get(key)
    if value is None and not required:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ManifestInvalid(where + key, "must be a number")
    if not math.isfinite(value) or value < 0:
        raise ManifestInvalid(where + key, "must be a finite number >= 0")


def _files(files: object, dump_format: object, expected: str) -> None:
    if not isinstance(files, dict):
        raise ManifestInvalid("files", "must be an object of file name -> sha256")
    for position, (name, digest) in enumerate(files.items(), 1):
        if dump_format == "custom":
            if name != expected:
                raise ManifestInvalid("files", f"entry {position}: must be {expected}")
        elif not isinstance(name, str) or not PLAIN_NAME.match(name):
            raise ManifestInvalid("files", f"entry {position}: not a plain file name")
        if not isinstance(digest, str) or not SHA256.match(digest):
            raise ManifestInvalid("files", f"entry {position}: not a sha256 hex digest")


def _tables(tables: object) -> None:
    if not isinstance(tables, dict):
        raise ManifestInvalid("tables", "must be an object of schema.table -> row count")
    for position, count in enumerate(tables.values(), 1):
        if not _is_int(count) or count < 0:
            raise ManifestInvalid("tables", f"entry {position}: row count must be an integer >= 0")


def _verifications(verifications: object) -> None:
    if not isinstance(verifications, list):
        raise ManifestInvalid("verifications", "must be a list")
    for position, entry in enumerate(verifications, 1):
        where = f"verifications[{position}]."
        if not isinstance(entry, dict):
            raise ManifestInvalid(f"verifications[{position}]", "must be an object")
        if entry.get("kind") not in VERIFICATION_KINDS:
            raise ManifestInvalid(where + "kind", f"must be one of {', '.join(VERIFICATION_KINDS)}")
        if not isinstance(entry.get("ok"), bool):
            raise ManifestInvalid(where + "ok", "must be true or false")
        try:
            _time(entry, "at", required=True)
        except ManifestInvalid as problem:
            raise ManifestInvalid(where + "at", problem.reason) from None
        _number(entry, "duration_seconds", required=True, where=where)
        if not isinstance(entry.get("detail", ""), str):
            raise ManifestInvalid(where + "detail", "must be a string")
        if set(entry) - {"kind", "ok", "at", "duration_seconds", "detail"}:
            raise ManifestInvalid(f"verifications[{position}]", "has unknown fields")
