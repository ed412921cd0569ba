"""The Alertmanager webhook's receiving end: a hostile-input parser, a bounded counter, a log line.

Whoever can reach the sidecar's port can post here, so a payload is checked against the shape
Alertmanager sends (version 4) before anything is counted or logged: sizes of keys, values,
label sets and the alert list are capped, every string must be valid Unicode, and a bad payload
is refused as a whole with one line naming the field. What is kept is bounded by construction:
at most ``MAX_ALERT_NAMES`` alert names (later ones count as ``(other)``) times three statuses,
whatever is posted. Log lines show control characters escaped, so a newline in a summary
cannot forge a line of its own.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("ops.alerts")

MAX_ALERT_BODY = 256 * 1024  # a group of a hundred alerts is ~60 KiB
MAX_ALERTS = 1000  # per post
MAX_ALERT_NAMES = 200  # distinct names kept as metric labels; further ones count as "(other)"
MAX_PAIRS = 64  # labels, or annotations, per alert
MAX_KEY = 256
MAX_LABEL_VALUE = 1024
MAX_ANNOTATION_VALUE = 8192
MAX_LOGGED = 50  # alerts logged one per line per post; the rest are summed up in one line
MAX_SHOWN = 300  # characters of a summary shown in the log
STATUSES = ("firing", "resolved")
REJECT_REASONS = ("unauthorized", "content_type", "too_large", "bad_payload", "disabled")
OTHER = "(other)"
_NAME = re.compile(r"^[A-Za-z_:][A-Za-z0-9_:.-]{0,127}$")


class PayloadError(ValueError):
    """A payload that is not what Alertmanager sends; the message names the field."""


def printable(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` for a log line: control and separator characters escaped, at most ``limit``."""
    shown = "".join(c if c.isprintable() else _escape(c) for c in text[:limit])
    return shown if len(text) <= limit else f"{shown}...(+{len(text) - limit} chars)"


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def token_matches(header: str | None, token: str) -> bool:
    """``Authorization: Bearer TOKEN``, compared in constant time."""
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return hmac.compare_digest(given.strip().encode("utf-8", "replace"), token.encode("utf-8"))


@dataclass(frozen=True)
class Alert:
    name: str
    status: str
    severity: str
    summary: str


def _text(value: Any, where: str, limit: int) -> str:
    if not isinstance(value, str):
        raise PayloadError(f"{where}: must be a string")
    if len(value) > limit:
        raise PayloadError(f"{where}: longer than {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError(f"{where}: not valid Unicode text") from None
    return value


def _pairs(value: Any, where: str, limit: int) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PayloadError(f"{where}: must be a mapping of strings")
    if len(value) > MAX_PAIRS:
        raise PayloadError(f"{where}: more than {MAX_PAIRS} entries")
    pairs = {}
    for key, item in value.items():
        name = _text(key, f"{where}: a key", MAX_KEY)
        pairs[name] = _text(item, f"{where}.{printable(name, 64)}", limit)
    return pairs


def parse_payload(payload: Any) -> list[Alert]:
    """The alerts of an Alertmanager webhook payload, or :class:`PayloadError`."""
    if not isinstance(payload, Mapping):
        raise PayloadError("payload: must be a JSON object")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("alerts: must be a list")
    if len(alerts) > MAX_ALERTS:
        raise PayloadError(f"alerts: more than {MAX_ALERTS} in one post")
    group_status = payload.get("status")
    parsed = []
    for index, alert in enumerate(alerts):
        where = f"alerts[{index}]"
        if not isinstance(alert, Mapping):
            raise PayloadError(f"{where}: must be an object")
        labels = _pairs(alert.get("labels"), f"{where}.labels", MAX_LABEL_VALUE)
        annotations = _pairs(alert.get("annotations"), f"{where}.annotations", MAX_ANNOTATION_VALUE)
        status = alert.get("status", group_status)
        if status is not None:
            _text(status, f"{where}.status", 32)
        parsed.append(
            Alert(
                name=labels.get("alertname", "unknown"),
                status=status if status in STATUSES else "unknown",
                severity=labels.get("severity", "none"),
                summary=annotations.get("summary") or annotations.get("description") or "",
            )
        )
    return parsed


class AlertReceiver(Collector):
    """Counts received alerts by (bounded) name and status, and rejected posts by reason."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._names: set[str] = set()
        self._rejected = dict.fromkeys(REJECT_REASONS, 0)

    def receive(self, payload: Any) -> int:
        alerts = parse_payload(payload)  # all or nothing: a bad post changes no count
        for alert in alerts[:MAX_LOGGED]:
            log.warning(
                "alert %s %s severity=%s: %s",
                alert.status,
                printable(alert.name, 128),
                printable(alert.severity, 32),
                printable(alert.summary),
            )
        if len(alerts) > MAX_LOGGED:
            log.warning(
                "%d more alerts in the same post, counted but not logged", len(alerts) - MAX_LOGGED
            )
        with self._lock:
            for alert in alerts:
                key = (self._bounded_name(alert.name), alert.status)
                self._counts[key] = self._counts.get(key, 0) + 1
        return len(alerts)

    def _bounded_name(self, name: str) -> str:
        if name in self._names:
            return name
        if len(self._names) >= MAX_ALERT_NAMES or not _NAME.match(name):
            return OTHER
        self._names.add(name)
        return name

    def reject(self, reason: str) -> None:
        with self._lock:
            self._rejected[reason] += 1

    def collect(self) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "dbops_alerts_received",
            "Alerts received from Alertmanager's webhook.",
            labels=["alertname", "status"],
        )
        rejected = CounterMetricFamily(
            "dbops_alerts_rejected",
            "Posts to the alerts webhook refused, by reason.",
            labels=["reason"],
        )
        with self._lock:
            for (name, status), count in sorted(self._counts.items()):
                received.add_metric([name, status], count)
            for reason, count in self._rejected.items():
                rejected.add_metric([reason], count)
        yield received
        yield rejected
