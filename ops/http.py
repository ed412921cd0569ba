"""The sidecar's HTTP face: ``/metrics``, ``/healthz``, ``/readyz`` and the ``/alerts`` webhook.

A plain WSGI app (testable without a socket) served by waitress, configured for probes and
scrapes rather than for web pages:

- one event loop holds every connection, so idle or half-sent connections cost a poll entry,
  not a thread; a request reaches the app only once it has arrived whole, so a request cut off
  half-way never runs as a scrape;
- a bounded pool of worker threads runs the app, and every endpoint answers by its deadline:
  slow work (a collection, a readiness query) runs on a thread of its own that concurrent
  requests share (:mod:`ops.deadline`), so a frozen database holds one thread, not all of them;
- a connection cap, an idle timeout, a listen backlog, and caps on header and body sizes.
"""

from __future__ import annotations

import gzip
import json
import logging
import resource
import socket
import threading
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from waitress import wasyncore
from waitress.server import create_server

from ops.alerts import MAX_ALERT_BODY, AlertReceiver, PayloadError, token_matches
from ops.deadline import DeadlineExceeded, SingleFlight

log = logging.getLogger("ops.http")

StartResponse = Callable[..., Any]
Check = Callable[[], tuple[bool, dict[str, Any]]]
ENDPOINTS = ["/metrics", "/healthz", "/readyz", "POST /alerts"]
JSON = "application/json"


@dataclass(frozen=True)
class HttpLimits:
    """How the server treats connections; the defaults suit Prometheus and container probes."""

    threads: int = 8
    connection_limit: int = 2000
    idle_timeout: float = 15.0  # a connection that sends nothing for this long is closed
    backlog: int = 1024
    deadline: float = 5.0  # /healthz, /readyz
    metrics_deadline: float = 10.0  # /metrics (Prometheus' default scrape_timeout)
    max_header: int = 16 * 1024
    max_body: int = MAX_ALERT_BODY


def _json(
    start_response: StartResponse,
    status: str,
    body: dict[str, Any],
    headers: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", JSON), ("Content-Length", str(len(data))), *headers])
    return [data]


class SidecarApp:
    """Routes the four endpoints; anything else is 404, a wrong method 405."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: Check,
        readiness: Check,
        alerts: AlertReceiver,
        *,
        alerts_token: str | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        self.registry = registry
        self.alerts = alerts
        self.alerts_token = alerts_token
        self.limits = limits or HttpLimits()
        self._metrics: SingleFlight[tuple[str, list[tuple[str, str]], bytes]] = SingleFlight(
            self._render_metrics, "metrics"
        )
        self._checks = {
            "/healthz": (SingleFlight(lambda _: health(), "healthz"), "healthy", "health check"),
            "/readyz": (SingleFlight(lambda _: readiness(), "readyz"), "ready", "readiness check"),
        }

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
            return self._serve_metrics(environ, start_response)
        if path in self._checks:
            return self._check(path, start_response)
        if path == "/":
            return _json(start_response, "200 OK", {"endpoints": ENDPOINTS})
        shown = json.dumps(path[:100])[1:-1]
        return _json(start_response, "404 Not Found", {"error": f"no such endpoint: {shown}"})

    # -- /healthz, /readyz ----------------------------------------------------------------------

    def _check(self, path: str, start_response: StartResponse) -> list[bytes]:
        flight, field, what = self._checks[path]
        try:
            ok, detail = flight.call(self.limits.deadline)
        except DeadlineExceeded as late:
            ok = False
            problem = f"{what} gave no answer within {self.limits.deadline:g}s ({late})"
            detail = {field: False, "problems": [problem]}
        except Exception as error:  # a bug in a check is a failed check, not a 500 page
            log.error("%s failed: %s", what, error)
            ok, detail = False, {field: False, "problems": [f"{what} failed: {error}"]}
        return _json(start_response, "200 OK" if ok else "503 Service Unavailable", detail)

    # -- /metrics -------------------------------------------------------------------------------

    def _serve_metrics(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        names = tuple(sorted(parse_qs(environ.get("QUERY_STRING", "")).get("name[]", [])))
        key = (
            str(environ.get("HTTP_ACCEPT") or "")[:512],
            gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or ""),
            names,
        )
        try:
            status, headers, body = self._metrics.call(self.limits.metrics_deadline, key)
        except DeadlineExceeded as late:
            text = f"# metrics not collected within {self.limits.metrics_deadline:g}s ({late})\n"
            start_response(
                "503 Service Unavailable",
                [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))],
            )
            return [text.encode()]
        except Exception as error:
            log.error("collecting metrics failed: %s", error)
            return _json(start_response, "500 Internal Server Error", {"error": str(error)})
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    def _render_metrics(self, key: Hashable) -> tuple[str, list[tuple[str, str]], bytes]:
        accept: str
        compress: bool
        names: tuple[str, ...]
        accept, compress, names = key  # type: ignore[misc]
        encoder, content_type = choose_encoder(accept)
        registry = self.registry.restricted_registry(names) if names else self.registry
        body = encoder(registry)
        headers = [("Content-Type", content_type)]
        if compress:
            body = gzip.compress(body, compresslevel=6)
            headers.append(("Content-Encoding", "gzip"))
        return "200 OK", headers, body

    # -- POST /alerts ---------------------------------------------------------------------------

    def _alerts(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        def refuse(status: str, reason: str, error: str, *headers: tuple[str, str]) -> list[bytes]:
            self.alerts.reject(reason)
            return _json(start_response, status, {"error": error}, headers)

        if self.alerts_token is None:
            return refuse(
                "403 Forbidden",
                "disabled",
                "the alerts webhook is off: set OPS_ALERTS_TOKEN or OPS_ALERTS_TOKEN_FILE",
            )
        if not token_matches(environ.get("HTTP_AUTHORIZATION"), self.alerts_token):
            return refuse(
                "401 Unauthorized",
                "unauthorized",
                "missing or wrong bearer token",
                ("WWW-Authenticate", 'Bearer realm="dbops"'),
            )
        content_type = str(environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
        if content_type != JSON:
            return refuse("400 Bad Request", "content_type", f"Content-Type must be {JSON}")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return refuse("400 Bad Request", "bad_payload", "bad Content-Length")
        if length > self.limits.max_body:
            return refuse(
                "413 Content Too Large",
                "too_large",
                f"body larger than {self.limits.max_body} bytes",
            )
        if length <= 0:
            return refuse("400 Bad Request", "bad_payload", "empty body")
        try:
            payload = json.loads(environ["wsgi.input"].read(length))
            received = self.alerts.receive(payload)
        except PayloadError as error:
            return refuse("400 Bad Request", "bad_payload", str(error))
        except RecursionError:
            return refuse("400 Bad Request", "bad_payload", "payload: nested too deeply")
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, int digit limit
            return refuse("400 Bad Request", "bad_payload", f"not JSON: {error}")
        return _json(start_response, "200 OK", {"received": received})


def raise_open_files_limit(wanted: int) -> int:
    """Lift the soft limit on open files towards ``wanted`` (never past the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        return ceiling
    return soft


class HttpServer:
    """Waitress on one listening socket, bound at construction (a taken port fails first)."""

    def __init__(
        self,
        host: str,
        port: int,
        app: Callable[..., Iterable[bytes]],
        limits: HttpLimits | None = None,
    ) -> None:
        limits = limits or HttpLimits()
        # every connection is a file descriptor; leave room for the pools, backups and logs
        files = raise_open_files_limit(limits.connection_limit + 256)
        connection_limit = max(16, min(limits.connection_limit, files - 256))
        if connection_limit < limits.connection_limit:
            log.warning(
                "open files limit %d allows %d connections, not %d",
                files,
                connection_limit,
                limits.connection_limit,
            )
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
        except OSError:
            listener.close()
            raise
        self._map: dict[int, Any] = {}
        self._server = create_server(
            app,
            map=self._map,
            sockets=[listener],
            threads=limits.threads,
            connection_limit=connection_limit,
            channel_timeout=limits.idle_timeout,
            cleanup_interval=max(1.0, min(limits.idle_timeout / 3, 30.0)),
            backlog=limits.backlog,
            asyncore_use_poll=True,  # select() stops at file descriptor 1024
            max_request_header_size=limits.max_header,
            max_request_body_size=limits.max_body,
            inbuf_overflow=64 * 1024,  # bodies past this wait in a temporary file, not in memory
            expose_tracebacks=False,
            log_socket_errors=False,
            ident="dbops",
        )
        # Under load every queued request logs "Task queue depth"; the queue is bounded anyway.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        self.host = host
        self.port = int(listener.getsockname()[1])
        self.connection_limit = connection_limit
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        """Waitress' loop, one poll at a time, so that a stop request ends it from this thread."""
        try:
            while not self._stopping.is_set() and self._map:
                wasyncore.loop(timeout=0.2, map=self._map, use_poll=True, count=1)
        finally:
            wasyncore.close_all(self._map)

    def shutdown(self, timeout: float = 2.0) -> None:
        """Close the port and every connection; requests still running get ``timeout``."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        else:
            wasyncore.close_all(self._map)
        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=timeout)
