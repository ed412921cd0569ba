"""The base backup the last good drill proved is never deleted by retention.

Barman's recovery-window retention deletes base backups by age alone. A backup a drill has
just restored and checked is the one we know works, so it gets Barman's own protection
(``barman keep --target full``: the backup and the WAL to recover from it stay, whatever the
policy says). One backup at a time: when a newer backup is proven, the previous one we kept is
released and retention handles it again. Only a keep recorded here is ever released; a backup
an operator kept by hand stays kept.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ops.pitr.barman import Barman
from ops.pitr.config import write_private
from ops.pitr.settings import SERVER_NAME
from ops.pitr.state import load_state

log = logging.getLogger(__name__)
KEEP_TARGET = "full"


@dataclass(frozen=True)
class KeepResult:
    kept: str
    released: str | None


def kept_backup(state_file: Path) -> str | None:
    """The backup id the last good drill protected, if any."""
    value = load_state(state_file).get("kept_backup")
    return value if isinstance(value, str) and value else None


def _record_kept(state_file: Path, backup_id: str) -> None:
    state = load_state(state_file)
    state["kept_backup"] = backup_id
    write_private(state_file, json.dumps(state, indent=2) + "\n")


def protect_proven(barman: Barman, backup_id: str) -> KeepResult:
    """Keep ``backup_id`` (just proven by a drill), then release the one kept before it.

    In that order: if keeping the new one fails, the old one stays protected. A previous
    backup that no longer exists (deleted by hand) is simply forgotten.
    """
    state_file = barman.settings.state_file
    previous = kept_backup(state_file)
    barman.run("keep", "--target", KEEP_TARGET, SERVER_NAME, backup_id)
    _record_kept(state_file, backup_id)
    if previous is None or previous == backup_id:
        return KeepResult(backup_id, None)
    if previous not in {backup.id for backup in barman.backups()}:
        log.info("pitr: the previously kept base backup %s no longer exists", previous)
        return KeepResult(backup_id, None)
    barman.run("keep", "--release", SERVER_NAME, previous)
    log.info("pitr: base backup %s released: %s is the newest proven one", previous, backup_id)
    return KeepResult(backup_id, previous)
