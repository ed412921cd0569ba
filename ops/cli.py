"""The ``ops`` command: parse, call a service, render. Exit 0 ok, 1 failed, 2 bad usage/config."""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from db.settings import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2  # the contract of every subcommand

# Each command's module, imported only when that command runs (or for help): a scheduled
# `ops backup run` should not pay for importing alembic and the seed.
COMMAND_MODULES = {
    "config": "ops.commands.config",
    "db": "ops.commands.db",
    "backup": "ops.commands.backup",
    "pitr": "ops.commands.pitr",
    "workload": "ops.commands.workload",
    "serve": "ops.commands.serve",
}

log = logging.getLogger("ops")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for ``command`` alone when it is known, else for every command."""
    parser = Parser(prog="ops", description="dbops: the database layer's operations command")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    if command in COMMAND_MODULES:
        importlib.import_module(COMMAND_MODULES[command]).register(commands)
    else:
        for module in COMMAND_MODULES.values():
            importlib.import_module(module).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    first = next((word for word in arguments if not word.startswith("-")), None)
    parser = build_parser(first)
    args = parser.parse_args(arguments)
    from ops.logs import setup_logging

    # The real settings are validated by each command; logging must work before that.
    log_format = os.environ.get("OPS_LOG_FORMAT", "").lower()
    setup_logging(log_format if log_format in ("text", "json") else "text")
    try:
        code: int = args.handler(args)
    except ConfigError as error:
        print("invalid configuration:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


def entry() -> NoReturn:
    """The console script: :func:`main`, then exit without the interpreter's final garbage
    collection. That pass walks every object the imports made (SQLAlchemy's are most of them),
    about 50 ms of a two-core machine on each call of a short command such as a scheduled
    ``ops backup run``; the process is about to end and holds nothing it would release.
    Handlers registered with :mod:`atexit`, buffered output and module teardown still run."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
