"""The object store as boto3 sees it: a client built from our settings, and a check that says
in one line what is wrong (unreachable, refused credentials, missing bucket).

boto3 is imported only here and only when off-host copying is on: a sidecar without
``OFFSITE_S3_URL`` never loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ops.offsite.settings import OffsiteSettings

if TYPE_CHECKING:
    from botocore.client import BaseClient

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
# Kinds of failure, as the upload-failure metric labels them.
UNREACHABLE = "unreachable"
CREDENTIALS = "credentials"
NO_BUCKET = "bucket"
SERVER = "server"
OTHER = "other"


class StoreError(Exception):
    """An object-store call that failed; ``kind`` is one of the kinds above, and the message is
    one line with no credential in it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def client(settings: OffsiteSettings, *, retries: int = 2) -> BaseClient:
    """An S3 client for the store; credentials are passed to it, never put in ``os.environ``."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"max_attempts": retries, "mode": "standard"},
        s3={"addressing_style": "path"} if settings.endpoint_url else {},
    )
    session = boto3.session.Session(
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        region_name=settings.region,
    )
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config)


def classify(error: BaseException, settings: OffsiteSettings) -> StoreError:
    """A boto3/botocore exception as a :class:`StoreError` naming the store, not the secret."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    where = settings.endpoint_url or "AWS S3"
    if isinstance(error, ClientError):
        response: dict[str, Any] = error.response
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchBucket",) or (status == 404 and code in ("404", "NotFound")):
            return StoreError(NO_BUCKET, f"bucket {settings.bucket} does not exist at {where}")
        if code in (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "403",
            "Forbidden",
        ):
            return StoreError(
                CREDENTIALS,
                f"{where} refused the credentials for bucket {settings.bucket} ({code})",
            )
        if status >= 500:
            return StoreError(SERVER, f"{where} answered {status} ({code or 'server error'})")
        return StoreError(OTHER, f"{where} refused the request: {code or status}")
    if isinstance(error, NoCredentialsError):
        return StoreError(
            CREDENTIALS, "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(error, EndpointConnectionError):
        return StoreError(UNREACHABLE, f"cannot reach {where}")
    if isinstance(error, BotoCoreError):
        return StoreError(UNREACHABLE, f"cannot talk to {where}: {type(error).__name__}")
    return StoreError(OTHER, f"{type(error).__name__} talking to {where}")


def listed_objects(
    settings: OffsiteSettings,
    prefix: str,
    *,
    s3: BaseClient | None = None,
    delimiter: str | None = None,
) -> Iterator[tuple[str, float]]:
    """(key, last-modified epoch) of every object under ``prefix``, page by page; a failure
    of the store is a :class:`StoreError`."""
    s3 = s3 if s3 is not None else client(settings)
    where: dict[str, str] = {"Bucket": settings.bucket, "Prefix": prefix}
    if delimiter is not None:
        where["Delimiter"] = delimiter
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(**where):
            for item in page.get("Contents", []):
                yield str(item["Key"]), item["LastModified"].timestamp()
    except StoreError:
        raise
    except Exception as error:
        raise classify(error, settings) from None


@dataclass(frozen=True)
class StoreCheck:
    ok: bool
    detail: str
    kind: str | None = None


def check(settings: OffsiteSettings) -> StoreCheck:
    """Whether the bucket exists and the credentials may use it; creates the bucket only when
    ``OFFSITE_CREATE_BUCKET`` asks for it."""
    s3 = client(settings, retries=1)
    try:
        s3.head_bucket(Bucket=settings.bucket)
    except Exception as error:
        problem = classify(error, settings)
        if problem.kind != NO_BUCKET:
            return StoreCheck(False, str(problem), problem.kind)
        if not settings.create_bucket:
            return StoreCheck(
                False,
                f"{problem} (create it, or set OFFSITE_CREATE_BUCKET=true to let dbops)",
                NO_BUCKET,
            )
        try:
            s3.create_bucket(Bucket=settings.bucket)
        except Exception as create_error:
            failed = classify(create_error, settings)
            return StoreCheck(False, f"creating bucket {settings.bucket}: {failed}", failed.kind)
        return StoreCheck(True, f"bucket {settings.bucket} created")
    return StoreCheck(True, f"bucket {settings.bucket} reachable")
