"""``ops pitr status | backup | list | check``: point-in-time recovery with Barman."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from ops.settings import Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(commands: Any) -> None:
    pitr = commands.add_parser(
        "pitr", help="point-in-time recovery: WAL streaming and base backups (Barman)"
    )
    actions = pitr.add_subparsers(dest="action", required=True)

    status = actions.add_parser("status", help="streaming, slot, archive and recovery window")
    status.add_argument("--json", action="store_true", help="print as JSON")
    status.set_defaults(handler=run_status)

    backup = actions.add_parser("backup", help="take a base backup now")
    backup.add_argument("--json", action="store_true", help="print the result as JSON")
    backup.set_defaults(handler=run_backup)

    listing = actions.add_parser("list", help="base backups, oldest first")
    listing.add_argument("--json", action="store_true", help="print as JSON")
    listing.set_defaults(handler=run_list)

    check = actions.add_parser("check", help="Barman's checks plus ours; exit 1 if any fails")
    check.add_argument("--json", action="store_true", help="print as JSON")
    check.set_defaults(handler=run_check)

    restore = actions.add_parser(
        "restore",
        help="restore a base backup and WAL into a directory, up to a time, an LSN or the end",
    )
    restore.add_argument("directory", help="where to restore (must be empty)")
    target = restore.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-time", help="e.g. '2026-11-28 14:05:00+00' (zone required)")
    target.add_argument("--target-lsn", help="e.g. 0/3000060")
    target.add_argument(
        "--target",
        choices=["latest"],
        help="everything the archive holds (locally, also the segment being streamed)",
    )
    restore.add_argument(
        "--replace",
        action="store_true",
        help="the directory is not empty: move what it holds to a sibling directory first",
    )
    restore.add_argument(
        "--dry-run",
        action="store_true",
        help="only check the target and the directory, and say which base backup would be used",
    )
    restore.add_argument(
        "--from",
        dest="source",
        choices=["local", "offsite"],
        default="local",
        help="local: this host's Barman archive; offsite: the object store alone (OFFSITE_*)",
    )
    restore.add_argument(
        "--wal",
        choices=["fetch", "stage"],
        default="fetch",
        help="with --from offsite: fetch WAL from the store during replay (restore_command), "
        "or stage it into the directory now (for a server without Barman Cloud)",
    )
    restore.add_argument("--json", action="store_true", help="print the result as JSON")
    restore.set_defaults(handler=run_restore)

    switch = actions.add_parser(
        "switch-wal", help="close the current WAL segment now and wait until it is archived"
    )
    switch.add_argument("--json", action="store_true", help="print the result as JSON")
    switch.set_defaults(handler=run_switch_wal)

    drill = actions.add_parser(
        "drill", help="prove a recovery point: markers around T, restore to T, check, remove"
    )
    drill.add_argument("--json", action="store_true", help="print the result as JSON")
    drill.set_defaults(handler=run_drill)


def _settings() -> Settings | None:
    settings = load_settings()
    if not settings.pitr.enabled:
        print("point-in-time recovery is off: set PITR_ENABLED=true", file=sys.stderr)
        return None
    return settings


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size = size / 1000  # type: ignore[assignment]
    return f"{size} B"


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return EXIT_FAILED


def run_status(args: argparse.Namespace) -> int:
    from ops.pitr.barman import make_barman
    from ops.pitr.service import pitr_engine
    from ops.pitr.status import gather

    settings = _settings()
    if settings is None:
        return EXIT_USAGE
    barman, engine = make_barman(settings), pitr_engine(settings)
    try:
        barman.prepare()
        status = gather(barman, engine)
    finally:
        engine.dispose()
    from ops.offsite.report import offsite_status

    offsite = offsite_status(settings)
    if offsite is not None:
        status.problems.extend(f"offsite: {problem}" for problem in offsite["problems"])
        for gap in offsite["gaps"] or []:
            status.problems.append(
                f"offsite: WAL {gap['first']}..{gap['last']} ({gap['count']}) missing in the store"
            )
    if args.json:
        print(json.dumps({**status.as_dict(), "offsite": offsite}, indent=2))
        return EXIT_OK if not status.problems else EXIT_FAILED
    slot = status.slot
    slot_text = "unknown"
    if slot is not None:
        slot_text = (
            f"{slot.name}: {slot.wal_status or 'active'}, {_size(slot.retained_bytes)} retained"
            if slot.exists
            else f"{slot.name}: missing"
        )
        slot_text += f" (cap {_size(status.cap_bytes) if status.cap_bytes else 'unlimited'})"
    good = status.good_backups
    rows = [
        ("WAL streaming", "running" if status.streaming else "NOT RUNNING"),
        ("Replication slot", slot_text),
        ("Lag", f"{_size(status.lag_bytes)}, {status.lag_seconds or 0:.1f}s"),
        (
            "Last WAL archived",
            f"{status.last_wal_archived or '-'} at {_when(status.last_wal_archived_at)}",
        ),
        (
            "Base backups",
            f"{len(good)}"
            + (f" (newest {good[-1].id}, {_size(good[-1].size_bytes)})" if good else ""),
        ),
        ("Recovery window", f"{_when(status.window_start)} .. {_when(status.window_end)}"),
    ]
    for gap in status.gaps:
        rows.append(
            (
                "Gap (unrecoverable)",
                f"WAL lost after {gap.get('after_wal') or 'the start'}; recoverable again from "
                f"the end of base backup {gap.get('backup_id') or '(none yet)'}",
            )
        )
    if offsite is not None:
        rows += [
            ("Off host", f"{offsite['url']}: {offsite['store_detail']}"),
            (
                "Off-host queue",
                f"{offsite['queued_wal_segments']} WAL ({_size(offsite['queued_wal_bytes'])}), "
                f"{len(offsite['queued_base_backups'])} base backup(s)",
            ),
            (
                "Last WAL shipped",
                f"{offsite['last_shipped_wal'] or '-'} "
                f"(archived {_when(offsite['last_shipped_wal_at'])})",
            ),
            ("Off-host window", f"from {_when(offsite['window_start'])}"),
        ]
    for label, value in rows:
        print(f"{label + ':':<19} {value}")
    for problem in status.problems:
        print(f"problem: {problem}", file=sys.stderr)
    return EXIT_OK if not status.problems else EXIT_FAILED


def run_backup(args: argparse.Namespace) -> int:
    from ops.pitr.barman import BarmanError, make_barman

    settings = _settings()
    if settings is None:
        return EXIT_USAGE
    barman = make_barman(settings)
    started = time.monotonic()
    try:
        barman.prepare()
        # Streaming must run for the backup's WAL to reach the archive: `barman cron` starts
        # it when it does not. When it runs already the sidecar's own cron (every
        # PITR_CRON_INTERVAL) applies retention, and `barman backup --wait` archives the WAL.
        if not barman.receiving():
            barman.cron()
        backup = barman.show(barman.backup())
    except BarmanError as error:
        return _fail(f"base backup failed: {error}")
    seconds = time.monotonic() - started
    if args.json:
        print(json.dumps({"backup": _backup_row(backup), "seconds": round(seconds, 3)}, indent=2))
    else:
        print(f"base backup {backup.id} ok: {_size(backup.size_bytes)} in {seconds:.1f}s")
    return EXIT_OK


def _backup_row(backup: Any, proven: str | None = None) -> dict[str, Any]:
    return {
        "id": backup.id,
        "status": backup.status,
        "begin_time": backup.begin_time,
        "end_time": backup.end_time,
        "size_bytes": backup.size_bytes,
        "wal_size_bytes": backup.wal_size_bytes,
        "begin_lsn": backup.begin_lsn,
        "end_lsn": backup.end_lsn,
        "timeline": backup.timeline,
        "retention_status": backup.retention_status,
        # Barman's keep annotation (never deleted by retention), and whether it is ours: the
        # backup the last good drill restored and checked.
        "kept": (backup.retention_status or "").startswith("KEEP"),
        "proven_by_drill": backup.id == proven,
    }


def run_list(args: argparse.Namespace) -> int:
    from ops.pitr.barman import BarmanError, make_barman
    from ops.pitr.keep import kept_backup

    settings = _settings()
    if settings is None:
        return EXIT_USAGE
    barman = make_barman(settings)
    try:
        barman.prepare()
        backups = barman.backups()
    except BarmanError as error:
        return _fail(str(error))
    proven = kept_backup(settings.pitr.state_file)
    rows = [_backup_row(b, proven) for b in backups]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(f"{'ID':<17} {'ENDED (UTC)':<24} {'SIZE':>10} {'WAL':>10}  {'STATUS':<8} RETENTION")
    for backup, row in zip(backups, rows, strict=True):
        note = " (kept: proven by the last good drill)" if row["proven_by_drill"] else ""
        print(
            f"{backup.id:<17} {_when(backup.end_time):<24} {_size(backup.size_bytes):>10} "
            f"{_size(backup.wal_size_bytes):>10}  {backup.status:<8} "
            f"{backup.retention_status or '-'}{note}"
        )
    return EXIT_OK


def run_check(args: argparse.Namespace) -> int:
    from ops.pitr.checks import run_checks

    settings = _settings()
    if settings is None:
        return EXIT_USAGE
    checks = run_checks(settings)
    failed = {name: item for name, item in checks.items() if item["status"] != "OK"}
    if args.json:
        print(json.dumps({"ok": not failed, "checks": checks}, indent=2))
    else:
        for name, item in checks.items():
            hint = f" ({item['hint']})" if item["hint"] else ""
            print(f"{name}: {item['status']}{hint}")
    return EXIT_FAILED if failed else EXIT_OK


def run_restore(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ops.pitr.barman import BarmanError, make_barman
    from ops.pitr.restore import RestoreRefused, parse_target, restore, with_end_lsns
    from ops.pitr.status import gather

    try:
        target = parse_target(args.target_time, args.target_lsn, args.target == "latest")
    except ValueError as error:
        print(f"ops pitr restore: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.source == "offsite":
        from ops.commands.pitr_offsite import run_offsite_restore

        return run_offsite_restore(args, target)
    settings = _settings()
    if settings is None:
        return EXIT_USAGE
    barman = make_barman(settings)
    try:
        barman.prepare()
        status = gather(barman, None)
        if args.dry_run:
            status = with_end_lsns(barman, status, target)
            return _dry_run(status, target, Path(args.directory), args.replace, args.json)
        result = restore(barman, status, target, Path(args.directory), replace=args.replace)
    except RestoreRefused as refused:
        return _fail(f"restore refused, nothing changed: {refused}")
    except BarmanError as error:
        return _fail(f"restore failed: {error}")
    if args.json:
        print(json.dumps(result.__dict__, indent=2))
        return EXIT_OK
    print(
        f"restored base backup {result.backup_id} into {result.destination} in "
        f"{result.seconds:.1f}s; PostgreSQL started there replays WAL to {result.target}, "
        "then promotes"
    )
    if result.kept:
        print(f"what {result.destination} held before is kept in {result.kept}")
    return EXIT_OK


def run_drill(args: argparse.Namespace) -> int:
    from ops.pitr.barman import make_barman
    from ops.pitr.drill import drill

    settings = _settings()
    if settings is None:
        return EXIT_USAGE
    barman = make_barman(settings)
    barman.prepare()
    record = drill(settings, barman)
    if args.json:
        print(json.dumps(record.__dict__, indent=2))
    elif record.ok:
        print(
            f"pitr drill ok: restored {record.backup_id}"
            f"{' from the object store' if record.source == 'offsite' else ''} to "
            f"{record.target_time} "
            f"and found exactly the rows committed before it, in {record.seconds:.1f}s"
            + ("; that base backup is now kept from retention" if record.kept else "")
        )
    else:
        print(f"pitr drill FAILED after {record.seconds:.1f}s: {record.error}", file=sys.stderr)
    return EXIT_OK if record.ok else EXIT_FAILED


def _dry_run(status: Any, target: Any, directory: Any, replace: bool, as_json: bool) -> int:
    from ops.pitr.restore import RestoreRefused, choose_backup

    backup = choose_backup(status, target)
    entries = list(directory.iterdir()) if directory.is_dir() else []
    if entries and not replace:
        raise RestoreRefused(f"{directory} is not empty; restore elsewhere, or add --replace")
    if as_json:
        print(json.dumps({"backup_id": backup.id, "target": target.describe()}, indent=2))
    else:
        print(f"would restore base backup {backup.id} into {directory} up to {target.describe()}")
    return EXIT_OK


def run_switch_wal(args: argparse.Namespace) -> int:
    from sqlalchemy import exc

    from db.errors import error_line
    from ops.pitr.barman import BarmanError, make_barman
    from ops.pitr.drill import DrillFailed, force_wal_out
    from ops.pitr.service import pitr_engine
    from ops.pitr.status import archived_wal

    settings = _settings()
    if settings is None:
        return EXIT_USAGE
    barman = make_barman(settings)
    engine = pitr_engine(settings)
    try:
        barman.prepare()
        with engine.connect() as connection:
            lsn = str(connection.exec_driver_sql("SELECT pg_current_wal_insert_lsn()").scalar())
        force_wal_out(settings, barman, lsn)
    except (BarmanError, DrillFailed) as error:
        return _fail(f"switch-wal failed: {error}")
    except exc.SQLAlchemyError as error:
        return _fail(f"switch-wal failed: {error_line(error)}")
    finally:
        engine.dispose()
    newest = archived_wal(settings.pitr)[1]
    if args.json:
        print(json.dumps({"archived_through_lsn": lsn, "newest_wal": newest}, indent=2))
    else:
        print(f"WAL up to {lsn} is archived (newest segment {newest})")
    return EXIT_OK
