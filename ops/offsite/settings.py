"""Settings of off-host copies to S3-compatible storage, read in the same pass as the others.

Off-host copying is optional: without ``OFFSITE_S3_URL`` nothing here is used. The store's
credentials are read like every secret (``AWS_ACCESS_KEY_ID`` or ``AWS_ACCESS_KEY_ID_FILE``)
and reach Barman Cloud and boto3 only through the environment of the process that needs them
(:meth:`OffsiteSettings.environment`), never a command line or a log.

Layout under ``s3://bucket/prefix``:

- ``<prefix>/dbops/wals/…`` and ``<prefix>/dbops/base/…``: Barman Cloud's layout for the
  server ``dbops`` (WAL segments and base backups), what CloudNativePG's plugin reads too;
- ``<prefix>/dumps/<database>/<id>.<ext>`` and ``….json``: the verified logical dumps with
  their manifests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from db.settings import EnvReader

# Bucket names as S3 allows them (3-63 of a-z, 0-9, '.', '-'; starting and ending alphanumeric).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# A key prefix of plain path segments: no empty, '.' or '..' segment, no control character.
_PREFIX_SEGMENT = re.compile(r"^[A-Za-z0-9._=+-]{1,200}$")
_REGION = re.compile(r"^[a-z0-9-]{1,40}$")
DUMPS_PREFIX = "dumps"
MAX_OFFSITE_RETENTION_DAYS = 3650


@dataclass(frozen=True)
class OffsiteSettings:
    url: str | None = None  # s3://bucket/prefix; None = off-host copying off
    endpoint_url: str | None = None  # None = AWS; MinIO, Ceph, moto and others otherwise
    region: str = "us-east-1"
    access_key_id: str | None = field(default=None, metadata={"secret": True})
    secret_access_key: str | None = field(default=None, metadata={"secret": True})
    retention_days: int | None = None  # None = the local recovery window (PITR_RETENTION)
    create_bucket: bool = False  # a missing bucket is an error unless this asks to create it
    directory: Path = Path("/var/lib/dbops/offsite")  # the upload queue: the sidecar's volume

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @property
    def bucket(self) -> str:
        assert self.url is not None
        return urlsplit(self.url).netloc

    @property
    def prefix(self) -> str:
        """The key prefix, without leading or trailing slash ('' for the bucket's root)."""
        assert self.url is not None
        return urlsplit(self.url).path.strip("/")

    def key(self, *parts: str) -> str:
        """An object key under the prefix."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    def environment(self) -> dict[str, str]:
        """What boto3 and Barman Cloud read: credentials and region, for a child's environment
        (``os.environ`` of this process is never changed)."""
        env = {"AWS_DEFAULT_REGION": self.region}
        if self.access_key_id is not None:
            env["AWS_ACCESS_KEY_ID"] = self.access_key_id
        if self.secret_access_key is not None:
            env["AWS_SECRET_ACCESS_KEY"] = self.secret_access_key
        return env


def read_offsite_settings(reader: EnvReader) -> OffsiteSettings:
    url = _read_url(reader)
    endpoint = _read_endpoint(reader)
    region = reader.string("OFFSITE_S3_REGION", reader.string("AWS_DEFAULT_REGION", "us-east-1"))
    if not _REGION.match(region):
        reader.problem("OFFSITE_S3_REGION", region, "must be a region name such as eu-west-1")
        region = OffsiteSettings.region
    key_id = reader.secret("AWS_ACCESS_KEY_ID")
    secret_key = reader.secret("AWS_SECRET_ACCESS_KEY")
    if url is not None and (key_id is None) != (secret_key is None):
        missing = "AWS_SECRET_ACCESS_KEY" if secret_key is None else "AWS_ACCESS_KEY_ID"
        reader.problem(
            missing, "(unset)", "is needed with the other key of the pair (or its _FILE)"
        )
    return OffsiteSettings(
        url=url,
        endpoint_url=endpoint,
        region=region,
        access_key_id=key_id,
        secret_access_key=secret_key,
        retention_days=_read_retention(reader),
        create_bucket=reader.boolean("OFFSITE_CREATE_BUCKET", OffsiteSettings.create_bucket),
        directory=_read_directory(reader),
    )


def _read_url(reader: EnvReader) -> str | None:
    text = reader.raw("OFFSITE_S3_URL")
    if text is None:
        return None
    parts = urlsplit(text)
    reason = None
    if not text.isprintable() or parts.scheme != "s3":
        reason = "must be s3://bucket or s3://bucket/prefix"
    elif parts.username is not None or parts.password is not None or "@" in parts.netloc:
        reason = "must not hold credentials: use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    elif parts.query or parts.fragment or "?" in text or "#" in text:
        reason = "must not have a query or fragment"
    elif not _BUCKET.match(parts.netloc) or ".." in parts.netloc:
        reason = "the bucket must be 3-63 of a-z, 0-9, '.' and '-'"
    elif parts.path.strip("/") and not all(
        _PREFIX_SEGMENT.match(s) and s not in (".", "..") for s in parts.path.strip("/").split("/")
    ):
        reason = "the prefix must be segments of A-Z, a-z, 0-9 and . _ = + - (no '..', no '//')"
    if reason is not None:
        reader.problem("OFFSITE_S3_URL", text, reason)
        return None
    return f"s3://{parts.netloc}/{parts.path.strip('/')}".rstrip("/")


def _read_endpoint(reader: EnvReader) -> str | None:
    text = reader.raw("OFFSITE_S3_ENDPOINT_URL")
    if text is None:
        return None
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        parts = parts._replace(netloc="")
    if (
        not text.isprintable()
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.query
        or parts.fragment
    ):
        reader.problem(
            "OFFSITE_S3_ENDPOINT_URL",
            text,
            "must be http(s)://host[:port] without credentials (empty for AWS S3)",
        )
        return None
    return text.rstrip("/")


def _read_retention(reader: EnvReader) -> int | None:
    """``OFFSITE_RETENTION``: the off-host recovery window in whole days."""
    text = reader.raw("OFFSITE_RETENTION")
    if text is None:
        return None
    seconds = reader.duration("OFFSITE_RETENTION", -1.0)
    if seconds == -1.0:
        return None  # the problem is recorded
    days, rest = divmod(seconds, 86400)
    if rest or not 1 <= days <= MAX_OFFSITE_RETENTION_DAYS:
        reader.problem(
            "OFFSITE_RETENTION",
            text,
            f"must be whole days from 1d to {MAX_OFFSITE_RETENTION_DAYS}d",
        )
        return None
    return int(days)


def _read_directory(reader: EnvReader) -> Path:
    text = reader.string("OFFSITE_DIR", str(OffsiteSettings.directory))
    if not text.startswith("/") or not text.isprintable():
        reader.problem("OFFSITE_DIR", text, "must be an absolute path of printable characters")
        return OffsiteSettings.directory
    return Path(text)
