"""Barman Cloud as command-line tools: ship one WAL file or one finished base backup, list and
delete base backups by a retention policy, in Barman Cloud's own layout for server ``dbops``.

We do not write an uploader: ``barman-cloud-wal-archive`` and ``barman-cloud-backup`` (in its
post-backup hook mode, which copies a backup Barman already took) do the uploads, so what
lands in the store is what ``barman-cloud-restore``, ``barman-cloud-wal-restore`` and
CloudNativePG's Barman Cloud plugin read. Credentials reach them through the environment only
(``ps`` shows the endpoint and the bucket, never a key); a failure is one line, classified like
the store check's (unreachable, credentials, bucket, server, other).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from ops.offsite.settings import OffsiteSettings
from ops.offsite.store import CREDENTIALS, NO_BUCKET, OTHER, SERVER, UNREACHABLE, StoreError
from ops.pitr.config import kept_environment
from ops.pitr.settings import SERVER_NAME

WAL_TIMEOUT = 300.0
BACKUP_TIMEOUT = 6 * 3600.0
LIST_TIMEOUT = 120.0
COMPRESSION = "--gzip"
# Words in Barman Cloud's error lines (boto3's messages) and the kind of failure they mean.
_KINDS = (
    (NO_BUCKET, ("NoSuchBucket", "bucket does not exist", "Bucket not found", "does not exist")),
    (
        CREDENTIALS,
        (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "Forbidden",
            "(403)",
            "Unable to locate credentials",
            "NoCredentials",
        ),
    ),
    (
        SERVER,
        ("ServiceUnavailable", "InternalError", "SlowDown", "(503)", "(500)", "(502)", "(504)"),
    ),
    (
        UNREACHABLE,
        (
            "Could not connect",
            "EndpointConnectionError",
            "Connection was closed",
            "ConnectionClosedError",
            "Connection reset",
            "ConnectTimeout",
            "ReadTimeout",
            "timed out",
            "Connection refused",
        ),
    ),
)


# A URL in an error line names the bucket, the prefix and the file, any of which may hold a
# word above ("dbops-503" is a bucket name, not a status): it is left out of the match.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def classify_output(text: str) -> str:
    """The kind of failure Barman Cloud's output reports. Status codes count only in the form
    boto3 prints them, ``An error occurred (503)``, so that a process id or a millisecond in
    the log prefix is not taken for one."""
    text = _URL.sub("", text)
    for kind, words in _KINDS:
        if any(word in text for word in words):
            return kind
    return OTHER


def _error_line(text: str) -> str:
    """Barman Cloud's error, without its log prefix (time, pid, level) or boto3's details."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    chosen = next((line for line in lines if "ERROR" in line), lines[-1] if lines else "")
    chosen = chosen.split("ERROR", 1)[-1].lstrip(": ")
    chosen = re.sub(r"^Barman cloud [A-Za-z ]*exception: ", "", chosen)
    return (chosen or "no output")[:300]


class BarmanCloud:
    """The ``barman-cloud-*`` programs next to the configured ``barman``."""

    def __init__(
        self, settings: OffsiteSettings, barman: Path, *, bounded_retries: bool = True
    ) -> None:
        assert settings.url is not None
        self.settings = settings
        self.bindir = barman.parent
        self.url = settings.url
        # The shipper's queue retries across calls with backoff, so each call retries little;
        # a restore has nothing to retry it later and keeps boto3's own retries.
        self.bounded_retries = bounded_retries

    def program(self, name: str) -> Path:
        return self.bindir / f"barman-cloud-{name}"

    def common_options(self) -> list[str]:
        options = []
        if self.settings.endpoint_url:
            options += ["--endpoint-url", self.settings.endpoint_url, "--addressing-style", "path"]
        return options

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = kept_environment()
        env.update(self.settings.environment())
        if self.bounded_retries:
            env.update({"AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"})
        env.update(extra or {})
        return env

    def run(
        self,
        name: str,
        args: list[str],
        *,
        timeout: float,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        command = [str(self.program(name)), *self.common_options(), *args]
        try:
            result = subprocess.run(
                command,
                env=self.environment(extra_env),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise StoreError(
                UNREACHABLE, f"barman-cloud-{name} did not finish within {timeout:g}s"
            ) from None
        except OSError as error:
            raise StoreError(OTHER, f"cannot run {command[0]}: {error.strerror}") from None
        if result.returncode != 0:
            output = result.stderr + "\n" + result.stdout
            raise StoreError(classify_output(output), f"barman-cloud-{name}: {_error_line(output)}")
        return result

    # -- shipping ------------------------------------------------------------------------------

    def archive_wal(self, path: Path) -> None:
        """Upload one WAL file (its name decides where: ``dbops/wals/<hash dir>/<name>.gz``)."""
        self.run(
            "wal-archive", [COMPRESSION, self.url, SERVER_NAME, str(path)], timeout=WAL_TIMEOUT
        )

    def upload_backup(self, backup_id: str, backup_dir: Path) -> None:
        """Upload a base backup Barman took, through barman-cloud-backup's post-backup hook
        mode (Barman's CloudBackupUploaderBarman): tarballs first, ``backup.info`` last, so a
        cut upload leaves no backup that the listing would show."""
        hook = {
            "BARMAN_HOOK": "backup_script",
            "BARMAN_PHASE": "post",
            "BARMAN_BACKUP_DIR": str(backup_dir),
            "BARMAN_BACKUP_ID": backup_id,
            "BARMAN_STATUS": "DONE",
            "BARMAN_BACKUP_INFO_PATH": str(backup_dir / "backup.info"),
            "BARMAN_SERVER": SERVER_NAME,
        }
        self.run(
            "backup",
            [COMPRESSION, self.url, SERVER_NAME],
            timeout=BACKUP_TIMEOUT,
            extra_env=hook,
        )

    # -- listing and retention -----------------------------------------------------------------

    def backups(self) -> list[dict[str, Any]]:
        """The base backups in the store, oldest first, as ``barman-cloud-backup-list`` sees
        them (only those whose ``backup.info`` arrived: complete uploads)."""
        result = self.run(
            "backup-list", ["--format", "json", self.url, SERVER_NAME], timeout=LIST_TIMEOUT
        )
        try:
            data = json.loads(result.stdout)
        except ValueError:
            raise StoreError(OTHER, "barman-cloud-backup-list: not JSON") from None
        listed = data.get("backups_list") if isinstance(data, dict) else None
        return [item for item in listed or [] if isinstance(item, dict)]

    def delete_by_policy(self, days: int, min_redundancy: int) -> None:
        """Apply ``RECOVERY WINDOW OF <days> DAYS`` off host; ``--minimum-redundancy`` keeps at
        least that many backups whatever their age. Barman Cloud deletes only backups of server
        ``dbops`` under our prefix and the WAL none of the kept ones needs."""
        self.run(
            "backup-delete",
            [
                "--retention-policy",
                f"RECOVERY WINDOW OF {days} DAYS",
                "--minimum-redundancy",
                str(min_redundancy),
                self.url,
                SERVER_NAME,
            ],
            timeout=BACKUP_TIMEOUT,
        )

    def test(self) -> None:
        """Barman Cloud's own connectivity and bucket test."""
        self.run("backup-list", ["--test", self.url, SERVER_NAME], timeout=LIST_TIMEOUT)
