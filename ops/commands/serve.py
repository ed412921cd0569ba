"""``ops serve``: the sidecar (exporter, scheduled jobs, health endpoints) until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import Any

from ops.logs import setup_logging
from ops.settings import load_settings


def register(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the sidecar: /metrics /healthz /readyz /alerts and the scheduled jobs",
        description="Listens on OPS_LISTEN (default 0.0.0.0:9188); stops cleanly on SIGTERM.",
    )
    serve.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    settings = load_settings()  # ConfigError => exit 2 before any thread or connection
    setup_logging(settings.sidecar.log_format, settings.sidecar.log_level)
    from ops.daemon import Daemon

    code = Daemon(settings).run()
    stuck = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if stuck:
        # A thread blocked on a frozen database cannot be interrupted, and Python's exit would
        # join the scheduler's worker threads, however long they wait. Everything was stopped
        # and logged above, so leave now: SIGTERM must end the process within its grace period.
        logging.getLogger("ops.daemon").debug("exiting past threads: %s", ", ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
