"""``ops workload``: the demo workload (see :mod:`ops.workload`), with its pool metrics served."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

EXIT_FAILED = 1

log = logging.getLogger("ops.workload")


def register(commands: Any) -> None:
    workload = commands.add_parser(
        "workload",
        help="run the demo workload: agents claiming tasks, writing results and knowledge",
        description="Configured by WORKLOAD_MODE (steady | saturate), WORKLOAD_CONCURRENCY, "
        "WORKLOAD_HOLD_SECONDS, WORKLOAD_THINK_SECONDS, WORKLOAD_DURATION, WORKLOAD_LISTEN "
        "and the DB_POOL_* settings. Stops cleanly on SIGTERM or SIGINT.",
    )
    workload.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from db.engine import create_engine
    from db.errors import error_line
    from db.metrics import instrument, start_metrics_server
    from ops.workload import Workload, WorkloadError, load_workload_settings

    db_settings, settings = load_workload_settings()
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()  # the run loop notices; nothing else happens in a signal handler

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    engine = create_engine(db_settings)
    server = None
    try:
        instrument(engine)
        server = start_metrics_server(settings.listen_host, settings.listen_port)
        log.info(
            "pool %r metrics on http://%s:%d/metrics; database %s",
            db_settings.application_name,
            settings.listen_host,
            settings.listen_port,
            db_settings.redacted_url,
        )
        Workload(engine, settings, stop).run()
    except WorkloadError as error:
        log.error("%s", error)
        return EXIT_FAILED
    except SQLAlchemyError as error:
        log.error("database error: %s", error_line(error))
        return EXIT_FAILED
    finally:
        if server is not None:
            server.shutdown()
        engine.dispose()
    return 0
