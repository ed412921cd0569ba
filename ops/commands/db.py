"""``ops db init | upgrade [REV] | downgrade REV | seed | import-knowledge FILE | check``.

Parse, call :mod:`db.migrate` / :mod:`db.seed`, render. Exit 0 ok, 1 the operation failed
(server unreachable, malformed export, schema not at head), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic.util.exc import CommandError
from sqlalchemy import exc
from sqlalchemy.engine import Engine

from db import migrate
from db.engine import create_engine
from db.errors import error_line
from db.seed.admin import AdminPasswordError
from db.seed.init import ServerUnavailable, initialize
from db.seed.knowledge import KnowledgeImportError, import_knowledge
from db.seed.run import seed
from ops.settings import Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# The CLI does one thing at a time; it needs a lock connection and a working one.
CLI_POOL = {"pool_size": 2, "max_overflow": 2}

log = logging.getLogger("ops.db")


def register(commands: Any) -> None:
    db = commands.add_parser("db", help="migrate, seed and check the database")
    actions = db.add_subparsers(dest="action", required=True)

    def action(name: str, handler: Callable[[argparse.Namespace], int], text: str) -> Any:
        parser = actions.add_parser(name, help=text, description=text)
        parser.set_defaults(handler=handler)
        return parser

    init = action(
        "init", run_init, "wait for the server, upgrade to head, create roles, seed (idempotent)"
    )
    init.add_argument("--json", action="store_true", help="print the summary as JSON")
    upgrade = action("upgrade", run_upgrade, "upgrade the schema (default: to head)")
    upgrade.add_argument("revision", nargs="?", default="head", metavar="REV")
    downgrade = action("downgrade", run_downgrade, "downgrade the schema ('base' drops it all)")
    downgrade.add_argument("revision", metavar="REV")
    seeding = action("seed", run_seed, "upsert agents, admin, samples and the shipped knowledge")
    seeding.add_argument("--json", action="store_true", help="print the summary as JSON")
    knowledge = action(
        "import-knowledge",
        run_import_knowledge,
        "validate a knowledge-base export (JSON Lines) and upsert it; all or nothing",
    )
    knowledge.add_argument("file", type=Path, metavar="FILE")
    knowledge.add_argument("--json", action="store_true", help="print the counts as JSON")
    check = action("check", run_check, "exit 1 unless the schema is at head and matches the models")
    check.add_argument("--json", action="store_true", help="print the result as JSON")


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"ops db: {message}", file=sys.stderr)
    return code


@contextmanager
def _engine(settings: Settings) -> Iterator[Engine]:
    engine = create_engine(settings.db, **CLI_POOL)
    try:
        yield engine
    finally:
        engine.dispose()


def _guarded(run: Callable[[Settings, Engine], int], args: argparse.Namespace) -> int:
    """Load the settings (ConfigError -> exit 2 in ops.cli), run, map failures to exit codes.

    Ctrl-C or SIGTERM anywhere is "interrupted" (exit 130, in ops.cli), also when it landed in
    a driver call that turned it into a cancelled statement; the transaction is rolled back."""
    from ops.interrupts import interrupt_on, stop_if_requested

    settings = load_settings()
    interrupt_on(signal.SIGINT, signal.SIGTERM)
    try:
        try:
            with _engine(settings) as engine:
                return run(settings, engine)
        except Exception:
            stop_if_requested()
            raise
    except KnowledgeImportError as error:
        for line in error.errors:
            print(line, file=sys.stderr)
        return _fail(f"import rejected: {error.total} problem(s), nothing was written")
    except (ServerUnavailable, AdminPasswordError, TimeoutError) as error:
        return _fail(str(error))
    except CommandError as error:
        return _fail(str(error), EXIT_USAGE)
    except exc.SQLAlchemyError as error:
        return _fail(f"database error on {settings.db.redacted_url}: {error_line(error)}")


def _print(args: argparse.Namespace, data: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print("\n".join(lines))


def run_init(args: argparse.Namespace) -> int:
    def run(settings: Settings, engine: Engine) -> int:
        report = initialize(engine, settings.db, settings.seed)
        _print(args, report.as_dict(), report.lines())
        log.info("init finished: %d change(s)", report.changed)
        return EXIT_OK

    return _guarded(run, args)


def _migrate(args: argparse.Namespace, action: str) -> int:
    def run(settings: Settings, engine: Engine) -> int:
        before, after = getattr(migrate, action)(engine, args.revision)
        print(f"schema: {before or 'empty'} -> {after or 'empty'}")
        return EXIT_OK

    return _guarded(run, args)


def run_upgrade(args: argparse.Namespace) -> int:
    return _migrate(args, "upgrade")


def run_downgrade(args: argparse.Namespace) -> int:
    return _migrate(args, "downgrade")


def run_seed(args: argparse.Namespace) -> int:
    def run(settings: Settings, engine: Engine) -> int:
        if migrate.current_revision(engine) != migrate.head_revision():
            return _fail("schema is not at head; run 'ops db upgrade' or 'ops db init' first")
        with migrate.migration_lock(engine):
            report = seed(engine, settings.seed)
        _print(args, report.as_dict(), report.lines())
        return EXIT_OK

    return _guarded(run, args)


def _progress(label: str) -> Callable[[int, int], None]:
    """A progress line redrawn in place on a terminal; plain log lines otherwise."""
    terminal = sys.stderr.isatty()

    def report(done: int, total: int) -> None:
        if terminal:
            end = "\n" if done == total else ""
            print(f"\r{label}: {done}/{total} entries", end=end, file=sys.stderr, flush=True)
        elif done == 0:
            log.info("%s: %d entries checked, writing", label, total)

    return report


def run_import_knowledge(args: argparse.Namespace) -> int:
    path: Path = args.file

    def run(settings: Settings, engine: Engine) -> int:
        with engine.begin() as connection:
            counts = import_knowledge(connection, path, _progress(f"importing {path}"))
        log.info("imported %s: %s", path, counts)
        _print(args, {"file": str(path), **counts.as_dict()}, [f"knowledge: {counts}"])
        return EXIT_OK

    return _guarded(run, args)


def run_check(args: argparse.Namespace) -> int:
    def run(settings: Settings, engine: Engine) -> int:
        problems = migrate.check(engine)
        current, head = migrate.current_revision(engine), migrate.head_revision()
        result = {"ok": not problems, "current": current, "head": head, "problems": problems}
        lines = problems or [f"schema at head ({head}) and matches the models"]
        _print(args, result, lines)
        return EXIT_OK if not problems else EXIT_FAILED

    return _guarded(run, args)
