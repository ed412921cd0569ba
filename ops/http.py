"""The sidecar's HTTP face: ``/metrics``, ``/healthz``, ``/readyz`` and the ``/alerts`` webhook.

A plain WSGI app (testable without a socket) served by a thread-per-request server, so a slow
``/metrics`` never delays a liveness probe.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("ops.alerts")

MAX_ALERT_BODY = 1 << 20  # Alertmanager batches are far smaller; refuse anything bigger
MAX_ALERT_NAMES = 200  # label cardinality cap: further names count as "(other)"

StartResponse = Callable[..., Any]
Check = Callable[[], tuple[bool, dict[str, Any]]]


class AlertReceiver(Collector):
    """Alertmanager webhook (payload version 4): one log line and one count per alert."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def receive(self, payload: Any) -> int:
        alerts = payload.get("alerts") if isinstance(payload, dict) else None
        if not isinstance(alerts, list):
            raise ValueError("payload has no alerts list")
        for alert in alerts:
            if not isinstance(alert, dict):
                continue
            labels = alert.get("labels") or {}
            annotations = alert.get("annotations") or {}
            status = str(alert.get("status") or payload.get("status") or "unknown")
            name = str(labels.get("alertname", "unknown"))
            severity = str(labels.get("severity", "none"))
            summary = str(annotations.get("summary") or annotations.get("description") or "")
            log.warning("alert %s %s severity=%s: %s", status, name, severity, summary)
            with self._lock:
                known = {alertname for alertname, _ in self._counts}
                if name not in known and len(known) >= MAX_ALERT_NAMES:
                    name = "(other)"
                key = (name, status if status in ("firing", "resolved") else "unknown")
                self._counts[key] = self._counts.get(key, 0) + 1
        return len(alerts)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "dbops_alerts_received",
            "Alerts received from Alertmanager's webhook.",
            labels=["alertname", "status"],
        )
        with self._lock:
            for (name, status), count in sorted(self._counts.items()):
                family.add_metric([name, status], count)
        yield family


def _json(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


class SidecarApp:
    """Routes the four endpoints; anything else is 404, a wrong method 405."""

    def __init__(
        self, registry: CollectorRegistry, health: Check, readiness: Check, alerts: AlertReceiver
    ) -> None:
        self.metrics = make_wsgi_app(registry)
        self.health = health
        self.readiness = readiness
        self.alerts = alerts

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/alerts":
            if method != "POST":
                return _json(start_response, "405 Method Not Allowed", {"error": "POST only"})
            return self._alerts(environ, start_response)
        if method not in ("GET", "HEAD"):
            return _json(start_response, "405 Method Not Allowed", {"error": "GET only"})
        if path == "/metrics":
            return self.metrics(environ, start_response)  # type: ignore[no-any-return]
        if path in ("/healthz", "/readyz"):
            ok, detail = (self.health if path == "/healthz" else self.readiness)()
            status = "200 OK" if ok else "503 Service Unavailable"
            return _json(start_response, status, detail)
        if path == "/":
            return _json(start_response, "200 OK", {"endpoints": ENDPOINTS})
        return _json(start_response, "404 Not Found", {"error": f"no such endpoint: {path}"})

    def _alerts(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_ALERT_BODY:
            return _json(start_response, "413 Content Too Large", {"error": "bad body length"})
        try:
            payload = json.loads(environ["wsgi.input"].read(length))
            received = self.alerts.receive(payload)
        except ValueError as error:  # JSONDecodeError is a ValueError
            return _json(start_response, "400 Bad Request", {"error": str(error)})
        return _json(start_response, "200 OK", {"received": received})


ENDPOINTS = ["/metrics", "/healthz", "/readyz", "POST /alerts"]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged: a scrape every 15 s would drown everything else."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class HttpServer:
    """Binds at construction (so a taken port fails before anything else starts)."""

    def __init__(self, host: str, port: int, app: Callable[..., Iterable[bytes]]) -> None:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]

        class Server(_ThreadingServer):
            address_family = family

        self._server = make_server(host, port, app, Server, handler_class=_QuietHandler)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="http", kwargs={"poll_interval": 0.2}
        )

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
