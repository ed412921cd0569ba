"""``ops pitr restore --from offsite``: recovery from the object store alone.

Needs only the settings (``OFFSITE_*`` and the store's credentials) and Barman Cloud's
programs: no Barman catalogue, no PITR_DIR, no running database. That is the machine left
after the host is gone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ops.pitr.restore import Target
from ops.settings import Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def cloud_from(settings: Settings) -> object:
    """The Barman Cloud programs beside PITR_BARMAN, or a one-line reason they are missing."""
    from ops.offsite.cloudread import CloudReader

    cloud = CloudReader(settings.offsite, settings.pitr.barman.parent)
    for name in ("restore", "wal-restore", "backup-list"):
        if not cloud.program(name).is_file():
            return (
                f"PITR_BARMAN {settings.pitr.barman}: no {cloud.program(name).name} beside it "
                "(install barman[cloud] there)"
            )
    return cloud


def run_offsite_restore(args: argparse.Namespace, target: Target) -> int:
    from ops.offsite.cloudread import CloudError, CloudReader
    from ops.offsite.recovery import plan, restore_from_store
    from ops.pitr.restore import RestoreRefused, prepare_destination

    settings = load_settings()
    if not settings.offsite.enabled:
        print("OFFSITE_S3_URL (unset): recovery from the object store needs it", file=sys.stderr)
        return EXIT_USAGE
    cloud = cloud_from(settings)
    if not isinstance(cloud, CloudReader):
        print(cloud, file=sys.stderr)
        return EXIT_USAGE
    directory = Path(args.directory)
    try:
        if args.dry_run:
            backup, _, _ = plan(cloud, target)
            entries = list(directory.iterdir()) if directory.is_dir() else []
            if entries and not args.replace:
                prepare_destination(directory.absolute(), replace=False)  # raises the refusal
            if args.json:
                print(json.dumps({"backup_id": backup.id, "target": target.describe()}, indent=2))
            else:
                print(
                    f"would restore base backup {backup.id} from the object store into "
                    f"{directory} up to {target.describe()}"
                )
            return EXIT_OK
        result = restore_from_store(
            cloud, target, directory, replace_existing=args.replace, wal=args.wal
        )
    except RestoreRefused as refused:
        print(f"restore refused, nothing changed: {refused}", file=sys.stderr)
        return EXIT_FAILED
    except CloudError as error:
        print(f"restore failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(result.__dict__, indent=2))
        return EXIT_OK
    print(
        f"restored base backup {result.backup_id} from the object store into "
        f"{result.destination} in {result.seconds:.1f}s; PostgreSQL started there replays WAL "
        f"from the store to {result.target}, then promotes"
    )
    if result.recovery_dir:
        print(
            f"{result.recovery_dir} holds restore_command's wrapper and the store's credentials "
            "(mode 0700): remove it once the server has promoted"
        )
    if result.kept:
        print(f"what {result.destination} held before is kept in {result.kept}")
    return EXIT_OK
