"""The off-host side of ``ops backup``: ``list --offsite``, ``restore --from offsite ID``,
``ship`` and ``prune --offsite``. Nothing here is imported unless one of them is asked for."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from ops.settings import Settings
from ops.units import human_size

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
OFF = "OFFSITE_S3_URL (unset): off-host copies are off; set it to s3://bucket[/prefix]"


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(message, file=sys.stderr)
    return code


def run_list(args: argparse.Namespace, settings: Settings, row: Callable[[Any], Any]) -> int:
    from ops.offsite.dumpfetch import offsite_backups
    from ops.offsite.store import StoreError

    if not settings.offsite.enabled:
        return _fail(OFF, EXIT_USAGE)
    try:
        shown, invalid = offsite_backups(settings)
    except StoreError as error:
        return _fail(f"list failed: {error}")
    for key, reason in invalid.items():
        print(f"{_printable(key)}: {_printable(reason)}; skipped", file=sys.stderr)
    if args.json:
        print(json.dumps([row(m) for m in shown], indent=2))
        return EXIT_OK
    print(f"{'ID':<24} {'STARTED (UTC)':<20} {'SIZE':>10}  LOCATION")
    for m in shown:
        print(
            f"{m.id:<24} {m.started.strftime('%Y-%m-%d %H:%M:%S'):<20} "
            f"{human_size(m.size_bytes):>10}  {settings.offsite.url}"
        )
    return EXIT_OK


def run_restore(
    args: argparse.Namespace, settings: Settings, restore: Callable[[Settings], int]
) -> int:
    """Download and check ``args.id``, then ``restore`` it from the staging directory."""
    from ops.backup.manifest import ID_PATTERN
    from ops.hints import spell
    from ops.offsite.dumpfetch import FetchError, fetched
    from ops.offsite.store import StoreError

    if not settings.offsite.enabled:
        return _fail(f"restore refused: {OFF}", EXIT_USAGE)
    if not ID_PATTERN.match(args.id):
        return _fail(
            f"restore refused: {_printable(args.id)!r} is not a backup id "
            f"({spell('ops backup list --offsite')} lists them)",
            EXIT_USAGE,
        )
    try:
        with fetched(settings, args.id) as local:
            return restore(local)
    except (FetchError, StoreError) as error:
        return _fail(f"restore failed: {error}; nothing was restored")
    except OSError as error:
        where = error.filename or settings.backup.directory
        return _fail(f"restore failed: {where}: {error.strerror}; nothing was restored")


def run_ship(args: argparse.Namespace, settings: Settings) -> int:
    """Queue what is verified and not shipped, then ship the queue now (no backoff wait)."""
    from ops.offsite.dumps import catch_up, ship_pending
    from ops.offsite.store import check

    if not settings.offsite.enabled:
        return _fail(OFF, EXIT_USAGE)
    # every outcome is printed below; the sidecar's log lines would say it a second time
    logging.getLogger("ops.offsite.dumps").setLevel(logging.CRITICAL)
    try:
        queued = catch_up(settings)
    except OSError as error:
        return _fail(f"ship failed: {error}")
    store = check(settings.offsite)
    if not store.ok:
        return _fail(f"ship failed: {store.detail}; {len(queued)} newly queued, nothing lost")
    report = ship_pending(settings, ignore_backoff=True)
    if args.json:
        print(
            json.dumps(
                {
                    "shipped": report.shipped,
                    "dropped": report.dropped,
                    "waiting": report.waiting,
                    "error": str(report.error) if report.error else None,
                },
                indent=2,
            )
        )
    else:
        for backup_id in report.shipped:
            print(f"shipped {backup_id}")
        for backup_id, why in report.dropped.items():
            print(f"not shipped {backup_id}: {why}")
        print(f"{report.waiting} backup(s) queued")
    if report.error is not None:
        return _fail(f"ship failed: {report.error}; {report.waiting} backup(s) stay queued")
    return EXIT_OK


def run_prune(args: argparse.Namespace, settings: Settings) -> int:
    from ops.offsite.dumpretention import prune_offsite
    from ops.offsite.store import StoreError

    if not settings.offsite.enabled:
        return _fail(OFF, EXIT_USAGE)
    try:
        result = prune_offsite(settings, dry_run=args.dry_run)
    except StoreError as error:
        return _fail(f"prune failed: {error}")
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    for doomed in result.plan.delete:
        print(f"{verb} {doomed.id} ({doomed.utc:%Y-%m-%d %H:%M:%S} UTC) off host")
    for backup_id, reasons in result.plan.keep.items():
        print(f"keep {backup_id}: {'; '.join(reasons)}")
    for key in result.left:
        print(f"left {_printable(key)}: not written by dbops")
    if not result.plan.delete:
        print("nothing to delete")
    return EXIT_OK


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
