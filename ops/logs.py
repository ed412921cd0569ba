"""Logging for the sidecar and the CLI: plain text on a terminal, or one JSON object a line."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from db.redact import redact

# The AWS SDK's debug lines hold request headers, the access key id among them (Credential=…):
# never below WARNING, whatever OPS_LOG_LEVEL says.
QUIET_LOGGERS = (
    "alembic.runtime.migration",
    "alembic.runtime.plugins",
    "apscheduler",
    "boto3",
    "botocore",
    "s3transfer",
    "urllib3",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """The plain format, with every password form in the message or traceback redacted: the
    last line of defence for a URL or conninfo that a library puts in its own messages."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _not_an_interrupt(record: logging.LogRecord) -> bool:
    """Drop a library's record of a Ctrl-C or ``docker stop`` it caught on the way: SQLAlchemy
    logs one with its traceback when the signal lands in a connection's close, then re-raises
    it. The command reports the interruption itself, in one line."""
    return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


def setup_logging(log_format: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_not_an_interrupt)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
