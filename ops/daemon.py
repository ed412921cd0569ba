"""The sidecar process: one scheduler, its components, the HTTP endpoints, a clean shutdown.

Shaped like Patroni's daemon: signal handlers only set a flag, the main loop notices it, and
shutdown runs in ``finally`` with each part stopped in its own ``try`` so one failure cannot
leave the others running. Components (the exporter, backups) add jobs to the one
``BackgroundScheduler`` and report health problems; jobs are wrapped by their owners so a
failing job becomes a metric and a log line, never a dead loop.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Protocol

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry, ProcessCollector
from sqlalchemy import exc
from sqlalchemy.engine import Engine

from db.engine import create_engine
from db.errors import error_line
from db.metrics import instrument
from db.redact import redact
from ops.alerts import AlertReceiver
from ops.http import HttpLimits, HttpServer, SidecarApp
from ops.settings import Settings

log = logging.getLogger("ops.daemon")

HEARTBEAT_SECONDS = 5.0
LOOP_SECONDS = 0.5
# Compose gives 30 s between SIGTERM and SIGKILL; stopping takes at most this, then ``ops serve``
# exits even if a thread is still stuck on a frozen database (it cannot be interrupted).
SHUTDOWN_SECONDS = 8.0
# An interpreter that has not run the main loop for this long is frozen: see FreezeWatchdog.
FREEZE_SECONDS = 20.0


class FreezeWatchdog:
    """Ends the process when the interpreter has stood still for ``seconds``.

    A C call that blocks while holding the GIL stops every Python thread, signal handlers
    included, and SIGTERM then waits for SIGKILL. psycopg2's ``connection.cancel()`` does that
    against a frozen server (libpq's PQcancel waits for the server's answer with the GIL held).
    faulthandler's watchdog is a C thread that needs no GIL: the main loop re-arms it twice a
    second, so it fires only when the loop has not run for ``seconds``; it writes every thread's
    stack to stderr, to show what froze, and exits with code 1.
    """

    def __init__(self, seconds: float = FREEZE_SECONDS) -> None:
        self.seconds = seconds

    def feed(self) -> None:
        faulthandler.dump_traceback_later(self.seconds, exit=True)

    def stop(self) -> None:
        faulthandler.cancel_dump_traceback_later()


class Component(Protocol):
    name: str

    def start(self, scheduler: BackgroundScheduler) -> None: ...  # add jobs; must not block
    def health_problems(self) -> list[str]: ...  # non-empty => /healthz 503
    def stop(self) -> None: ...


def build_components(settings: Settings, registry: CollectorRegistry) -> list[Component]:
    """Everything the sidecar runs besides its own loop and endpoints."""
    from ops.backup.service import BackupService
    from ops.collectors.exporter import ExporterService

    backups = BackupService(settings, registry)
    components: list[Component] = [ExporterService(settings, registry), backups]
    counters = None
    dumps = None
    if settings.offsite.enabled:
        from ops.offsite.dumpservice import DumpShippingService
        from ops.offsite.metrics import OffsiteCounters

        counters = OffsiteCounters(registry)  # shared by every off-host shipper
        failures = counters.failures
        dumps = DumpShippingService(
            settings, None, on_failure=lambda kind: failures.labels("dump", kind).inc()
        )
        backups.after_verification = dumps.verified
        components.append(dumps)
    shipper = None
    if settings.pitr.enabled:
        from ops.pitr.service import PitrService

        pitr = PitrService(settings, registry, offsite_counters=counters)
        shipper = pitr.shipper
        components.append(pitr)
    if counters is not None:
        from ops.offsite.metrics import OffsiteCollector

        registry.register(OffsiteCollector(shipper, dumps.state if dumps is not None else None))
    return components


class Readiness:
    """``/readyz``: the database answers (with the normal login) and the schema is at head."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        from db.revisions import head_revision

        sidecar = settings.sidecar
        timeout_ms = max(1, int(sidecar.query_timeout * 1000))
        lock_ms = max(1, int(sidecar.lock_timeout * 1000))
        self.head = head_revision()
        self.engine: Engine = create_engine(
            settings.db,
            pool_size=1,
            max_overflow=0,
            pool_timeout=sidecar.query_timeout,
            pool_pre_ping=False,
            isolation_level="AUTOCOMMIT",
            connect_args={
                "application_name": f"{sidecar.application_name}-ready",
                "connect_timeout": max(2, int(sidecar.query_timeout + 0.999)),
                "options": f"-c statement_timeout={timeout_ms} -c lock_timeout={lock_ms}",
            },
        )
        instrument(self.engine, registry)

    def check(self) -> tuple[bool, dict[str, Any]]:
        for attempt in (1, 2):
            try:
                with self.engine.connect() as connection:
                    present = connection.exec_driver_sql(
                        "SELECT to_regclass('alembic_version') IS NOT NULL"
                    ).scalar_one()
                    current = (
                        connection.exec_driver_sql(
                            "SELECT version_num FROM alembic_version"
                        ).scalar()
                        if present
                        else None
                    )
                break
            except exc.DBAPIError as error:
                if attempt == 1 and error.connection_invalidated:
                    continue  # the server restarted since the last probe: retry on a new one
                return False, {
                    "ready": False,
                    "problems": [f"database unreachable: {error_line(error)}"],
                }
            except exc.SQLAlchemyError as error:
                return False, {
                    "ready": False,
                    "problems": [f"database unreachable: {error_line(error)}"],
                }
        if current != self.head:
            problem = f"schema at {current or 'no revision'}, head is {self.head}"
            return False, {"ready": False, "problems": [problem], "revision": current}
        return True, {"ready": True, "revision": current}

    def stop(self) -> None:
        self.engine.dispose()


class Daemon:
    """Runs until SIGTERM or SIGINT; :meth:`run` returns the process exit code."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        components: list[Component] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)  # the sidecar's own CPU, memory, open fds
        self.alerts = AlertReceiver()
        self.registry.register(self.alerts)
        self.readiness = Readiness(settings, self.registry)
        self.components = (
            components if components is not None else build_components(settings, self.registry)
        )
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(8)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 60},
        )
        self._stop = threading.Event()
        self._signal: str | None = None
        self._loop_beat = time.monotonic()
        self._scheduler_beat = time.monotonic()
        self.http: HttpServer | None = None
        self.watchdog = FreezeWatchdog()

    # -- health ---------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        problems: list[str] = []
        now = time.monotonic()
        if now - self._loop_beat > 10 * LOOP_SECONDS + 5:
            problems.append(f"main loop stalled for {now - self._loop_beat:.0f}s")
        if not self.scheduler.running:
            problems.append("scheduler is not running")
        elif now - self._scheduler_beat > 3 * HEARTBEAT_SECONDS + 5:
            problems.append(f"scheduler ran no job for {now - self._scheduler_beat:.0f}s")
        for component in self.components:
            try:
                problems.extend(component.health_problems())
            except Exception as error:
                problems.append(f"{component.name}: health check failed: {redact(str(error))}")
        return not problems, {"healthy": not problems, "problems": problems}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """``/readyz``: the database check, with what components add to its detail."""
        ok, detail = self.readiness.check()
        for component in self.components:
            extra = getattr(component, "readiness_detail", None)
            if extra is None:
                continue
            try:
                detail.update(extra())
            except Exception as error:
                detail[component.name] = f"detail failed: {redact(str(error))}"
        return ok, detail

    def _heartbeat(self) -> None:
        self._scheduler_beat = time.monotonic()

    # -- lifecycle --------------------------------------------------------------------------------

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        """Signal handler: only sets the flag the main loop waits on."""
        self._signal = signal.Signals(signum).name if signum else "request"
        self._stop.set()

    def run(self) -> int:
        sidecar = self.settings.sidecar
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self.request_stop)
        try:
            try:
                limits = http_limits(self.settings)
                app = SidecarApp(
                    self.registry,
                    self.health,
                    self.ready,
                    self.alerts,
                    alerts_token=sidecar.alerts_token,
                    limits=limits,
                )
                self.http = HttpServer(sidecar.listen_host, sidecar.listen_port, app, limits)
            except OSError as error:
                log.error(
                    "cannot listen on %s:%s: %s", sidecar.listen_host, sidecar.listen_port, error
                )
                return 1
            self.scheduler.start()
            self.scheduler.add_job(
                self._heartbeat,
                "interval",
                seconds=HEARTBEAT_SECONDS,
                id="heartbeat",
                next_run_time=datetime.now(UTC),
            )
            for component in self.components:
                try:
                    component.start(self.scheduler)
                except Exception as error:  # fail fast and plainly; the supervisor restarts us
                    log.error("starting %s failed: %s", component.name, error)
                    return 1
            self.http.start()
            log.info(
                "serving /metrics /healthz /readyz /alerts on %s:%d (%s)",
                sidecar.listen_host,
                self.http.port,
                ", ".join(component.name for component in self.components),
            )
            if sidecar.alerts_token is None:
                log.warning("POST /alerts is off: set OPS_ALERTS_TOKEN or OPS_ALERTS_TOKEN_FILE")
            self.watchdog.feed()
            while not self._stop.wait(LOOP_SECONDS):
                self._loop_beat = time.monotonic()
                self.watchdog.feed()
            log.info("stopping on %s", self._signal)
            return 0
        finally:
            self._shutdown()  # still watched: a stop step that freezes the interpreter ends it
            self.watchdog.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _shutdown(self) -> None:
        """Stop each part in turn, within ``SHUTDOWN_SECONDS`` in all, whatever the database does.

        Each step runs on a thread of its own: a step stuck on a frozen server (disposing a
        pool whose connection is mid-query) is left behind, logged, and the next one runs.
        """
        steps: list[tuple[str, Any]] = []
        if self.http is not None:
            steps.append(("http server", self.http.shutdown))
        if self.scheduler.running:
            steps.append(("scheduler", lambda: self.scheduler.shutdown(wait=False)))
        steps += [(component.name, component.stop) for component in self.components]
        steps.append(("readiness engine", self.readiness.stop))
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        for name, stop in steps:
            errors: list[BaseException] = []

            def run(stop: Any = stop, errors: list[BaseException] = errors) -> None:
                try:
                    stop()
                except Exception as error:
                    errors.append(error)

            worker = threading.Thread(target=run, name=f"stop {name}", daemon=True)
            worker.start()
            worker.join(max(0.1, deadline - time.monotonic()))
            if worker.is_alive():
                log.error("stopping %s did not finish in time; leaving it", name)
            elif errors:
                log.error("stopping %s failed: %s", name, errors[0])
        log.info("stopped")


def http_limits(settings: Settings) -> HttpLimits:
    sidecar = settings.sidecar
    return HttpLimits(
        threads=sidecar.http_threads,
        connection_limit=sidecar.http_connections,
        idle_timeout=sidecar.http_idle_timeout,
        backlog=sidecar.http_backlog,
        deadline=sidecar.http_deadline,
        # the exporter answers by its own deadline (2 x query timeout + 1 s); this adds the rest
        metrics_deadline=sidecar.http_deadline + 2 * sidecar.query_timeout + 1,
    )
