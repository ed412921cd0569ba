"""``ops backup run | list [--offsite] | verify [ID] | restore ID --target-db NAME [--from offsite]
| ship | prune [--offsite]``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any

from db.errors import error_line
from ops.interrupts import interrupt_on, stop_if_requested
from ops.settings import Settings, load_settings
from ops.units import human_size

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(commands: Any) -> None:
    backup = commands.add_parser("backup", help="take, list, verify, restore and prune backups")
    actions = backup.add_subparsers(dest="action", required=True)

    run = actions.add_parser("run", help="take a backup now, then apply retention")
    run.add_argument("--json", action="store_true", help="print the manifest as JSON")
    run.set_defaults(handler=run_backup)

    listing = actions.add_parser("list", help="good backups of the configured database")
    listing.add_argument("--json", action="store_true", help="print as JSON")
    listing.add_argument("--all", action="store_true", help="include failed runs")
    listing.add_argument(
        "--offsite", action="store_true", help="the dumps in the off-host store (OFFSITE_S3_URL)"
    )
    listing.set_defaults(handler=run_list)

    verify = actions.add_parser("verify", help="check a backup (default: the newest)")
    verify.add_argument("id", nargs="?", help="backup id (default: newest)")
    verify.add_argument(
        "--drill", action="store_true", help="restore into a scratch database and compare rows"
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=run_verify)

    restore = actions.add_parser("restore", help="restore a backup into a new database")
    restore.add_argument("id", help="backup id")
    restore.add_argument(
        "--target-db",
        required=True,
        metavar="NAME",
        help="database name (not a connection string) to create and restore into",
    )
    restore.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty target; the current one is renamed and kept, not dropped",
    )
    restore.add_argument(
        "--replace-live",
        action="store_true",
        help="with --force: the target is the live database the stack runs on, replace it",
    )
    restore.add_argument(
        "--allow-postgres-db",
        action="store_true",
        help="allow the maintenance database postgres as the target",
    )
    restore.add_argument("-j", "--jobs", type=int, default=None, help="parallel restore jobs")
    restore.add_argument(
        "--from",
        dest="source",
        choices=("local", "offsite"),
        default="local",
        help="offsite: download the dump from the off-host store first (OFFSITE_S3_URL)",
    )
    restore.set_defaults(handler=run_restore)

    ship = actions.add_parser(
        "ship", help="copy verified backups not yet off host to the store now"
    )
    ship.add_argument("--json", action="store_true", help="print the result as JSON")
    ship.set_defaults(handler=run_ship)

    prune = actions.add_parser("prune", help="apply the retention policy")
    prune.add_argument("--dry-run", action="store_true", help="show what would be deleted")
    prune.add_argument("--json", action="store_true", help="print as JSON")
    prune.add_argument(
        "--offsite", action="store_true", help="apply retention to the off-host copies instead"
    )
    prune.set_defaults(handler=run_prune)


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return EXIT_FAILED


def printable(text: str) -> str:
    """Text from a manifest on one terminal line: control characters escaped, so a planted
    manifest cannot forge lines or move the cursor."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def run_backup(args: argparse.Namespace) -> int:
    from ops.backup.lock import LockHeld
    from ops.backup.prune import prune
    from ops.backup.runner import BackupError
    from ops.backup.runner import run_backup as run

    settings = load_settings()
    tty = sys.stderr.isatty()
    pruned: list[str] = []
    # the result is printed below; the sidecar's summary log line would say it a second time
    logging.getLogger("ops.backup.summary").setLevel(logging.WARNING)
    # Ctrl-C and `docker stop` unwind the run so it removes its temporaries; the request is
    # kept, so a lost KeyboardInterrupt still stops it (ops.interrupts).
    stopping = interrupt_on(signal.SIGINT, signal.SIGTERM)

    def progress(size: int) -> None:
        print(f"\rdumping {settings.db.database}: {human_size(size)}", end="", file=sys.stderr)

    def retention(taken: Any) -> None:
        try:  # the backup just taken is never pruned by its own run, whatever the clocks say
            pruned.extend(prune(settings, locked=True, protected=(taken.id,)).deleted)
        except Exception as error:  # the backup itself is good; say why nothing was pruned
            print(f"retention failed (backup kept): {error}", file=sys.stderr)

    try:
        manifest = run(
            settings,
            progress=progress if tty else None,
            cancel=stopping,
            after_success=retention,
        )
    except LockHeld as held:
        return _fail(f"backup not started: {held}")
    except BackupError as error:
        stop_if_requested()  # cancelled by a signal whose KeyboardInterrupt was lost
        return _fail(f"{chr(10) if tty else ''}backup failed: {error}")
    finally:
        if tty:
            print(file=sys.stderr)
    if args.json:
        print(json.dumps({"backup": _row(manifest), "pruned": pruned}, indent=2))
    else:
        print(
            f"backup {manifest.id} ok: {human_size(manifest.size_bytes)} in "
            f"{manifest.duration_seconds:.1f}s, {len(manifest.tables)} tables"
        )
        if pruned:
            print(f"retention deleted: {', '.join(pruned)}")
    return EXIT_OK


def _verified(manifest: Any) -> str:
    latest = manifest.last_verification()
    if latest is None:
        return "-"
    return f"{latest.kind} {'ok' if latest.ok else 'FAILED'}"


def _row(manifest: Any) -> dict[str, Any]:
    return {
        "id": manifest.id,
        "database": manifest.database,
        "started_at": manifest.started_at,
        "finished_at": manifest.finished_at,
        "size_bytes": manifest.size_bytes,
        "duration_seconds": manifest.duration_seconds,
        "format": manifest.format,
        "status": manifest.status,
        "verified": manifest.verified,
        "last_verification": _verified(manifest),
        "path": manifest.path,
        "error": manifest.error,
    }


def run_list(args: argparse.Namespace) -> int:
    from ops.backup.manifest import BackupDirectory

    settings = load_settings()
    if args.offsite:
        from ops.commands import backup_offsite

        return backup_offsite.run_list(args, settings, _row)
    store = BackupDirectory(settings.backup.directory)
    database = settings.db.database
    try:
        if args.all:
            shown = [m for m in store.manifests() if m.database == database]
        else:
            shown = store.backups(database)
    except OSError as error:  # BackupDirError: missing or unreadable; never an empty listing
        return _fail(f"list failed: {error}")
    if store.invalid:
        print(
            f"{len(store.invalid)} invalid manifest(s) skipped (see the warnings above)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps([_row(m) for m in shown], indent=2))
        return EXIT_OK
    header = (
        f"{'ID':<24} {'STARTED (UTC)':<20} {'SIZE':>10} {'DURATION':>9}  {'VERIFIED':<15} STATUS"
    )
    print(header)
    for m in shown:
        print(
            f"{m.id:<24} {m.started.strftime('%Y-%m-%d %H:%M:%S'):<20} "
            f"{human_size(m.size_bytes):>10} {(m.duration_seconds or 0):>8.1f}s  "
            f"{_verified(m):<15} {m.status}"
            f"{' (' + printable(m.error or '') + ')' if not m.ok else ''}"
        )
    return EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    from ops.backup.lock import LockHeld
    from ops.backup.verify import VerifyError, as_dict, check, drill, resolve

    settings = load_settings()
    try:
        manifest = resolve(settings, args.id)
        verification = drill(settings, manifest) if args.drill else check(settings, manifest)
    except (VerifyError, LockHeld, OSError) as problem:
        return _fail(f"verify failed: {problem}")
    if args.json:
        print(json.dumps(as_dict(manifest, verification), indent=2))
    else:
        state = "ok" if verification.ok else "FAILED"
        print(f"{manifest.id} {verification.kind} {state}: {printable(verification.detail)}")
    return EXIT_OK if verification.ok else EXIT_FAILED


def run_restore(args: argparse.Namespace) -> int:
    settings: Settings = load_settings()
    if args.source == "offsite":
        from ops.commands import backup_offsite

        return backup_offsite.run_restore(args, settings, lambda local: _restore(args, local))
    return _restore(args, settings)


def run_ship(args: argparse.Namespace) -> int:
    from ops.commands import backup_offsite

    return backup_offsite.run_ship(args, load_settings())


def _restore(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from ops.backup.pgtools import ToolError
    from ops.backup.restore import RestoreError, restore_backup
    from ops.backup.target import TargetError

    tty = sys.stderr.isatty()
    last_shown = [-1]

    def progress(done: int, total: int, item: str) -> None:
        stop_if_requested()
        if tty:
            print(f"\r\x1b[K[{done}/{total}] {item[:70]}", end="", file=sys.stderr)
        elif total and done * 10 // total != last_shown[0]:
            last_shown[0] = done * 10 // total
            print(f"restore: {done}/{total} items", file=sys.stderr)

    jobs = args.jobs if args.jobs is not None else settings.backup.jobs
    if jobs < 1:
        return _fail("-j must be at least 1")
    interrupt_on(signal.SIGINT, signal.SIGTERM)  # a stopped restore drops its staging database
    try:
        result = restore_backup(
            settings,
            args.id,
            args.target_db,
            force=args.force,
            replace_live=args.replace_live,
            allow_postgres=args.allow_postgres_db,
            jobs=jobs,
            progress=progress,
        )
    except TargetError as error:
        print(f"restore refused: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (RestoreError, ToolError, SQLAlchemyError) as error:
        reason = error_line(error)
        return _fail(f"{chr(10) if tty else ''}restore failed: {reason}")
    finally:
        if tty:
            print(file=sys.stderr)
    print(
        f"restored {result.backup_id} into {result.target} in "
        f"{result.duration_seconds:.1f}s ({result.items} archive items"
        f"{', target replaced' if result.replaced else ''})"
    )
    if result.kept is not None:
        for line in _going_back(result.target, result.kept):
            print(line)
    return EXIT_OK


def _going_back(target: str, kept: str) -> list[str]:
    from ops.backup.pgtools import quote_ident
    from ops.backup.target import KEPT_INFIX

    current, old = quote_ident(target), quote_ident(kept)
    head, _, stamp = kept.rpartition(KEPT_INFIX)
    back = quote_ident(f"{head}_restored_{stamp}")  # as long as the kept name: it fits
    return [
        f"the database replaced is kept as {old}; nothing was dropped",
        "to go back (with the services stopped): "
        f"ALTER DATABASE {current} RENAME TO {back}; ALTER DATABASE {old} RENAME TO {current};",
        f"once it is no longer needed: DROP DATABASE {old};",
    ]


def run_prune(args: argparse.Namespace) -> int:
    from ops.backup.lock import LockHeld
    from ops.backup.manifest import BackupDirError, UnsafeEntry
    from ops.backup.prune import prune

    settings = load_settings()
    if args.offsite:
        from ops.commands import backup_offsite

        return backup_offsite.run_prune(args, settings)
    try:
        result = prune(settings, dry_run=args.dry_run)
    except LockHeld as held:
        return _fail(f"prune not started: {held}")
    except (BackupDirError, UnsafeEntry) as error:
        return _fail(f"prune failed: {error}")
    except OSError as error:
        return _fail(
            f"prune failed: {error.filename or settings.backup.directory}: {error.strerror}"
        )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    for doomed in result.plan.delete:
        if doomed.id in result.skipped:
            print(f"kept {doomed.id} this time: {result.skipped[doomed.id]}")
            continue
        print(f"{verb} {doomed.id} ({doomed.utc:%Y-%m-%d %H:%M:%S} UTC)")
    for backup_id, reasons in result.plan.keep.items():
        print(f"keep {backup_id}: {'; '.join(reasons)}")
    if not result.plan.delete:
        print("nothing to delete")
    if result.invalid:
        print(f"{len(result.invalid)} invalid manifest(s) ignored", file=sys.stderr)
    return EXIT_OK
