"""What PITR remembers between runs: the drills' results. One small JSON file in PITR_DIR,
replaced atomically; a damaged file is reported and treated as empty, never a crash."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ops.pitr.config import write_private

log = logging.getLogger(__name__)
MAX_STATE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class DrillRecord:
    at: float  # when the drill finished (Unix time)
    ok: bool
    seconds: float  # restore + replay + checks: the measured recovery time
    backup_id: str | None = None
    target_time: str | None = None
    error: str | None = None
    kept: bool = False  # the proven base backup is protected from retention (ops.pitr.keep)
    source: str = "local"  # PITR_DRILL_SOURCE: this host's archive, or the object store


def load_state(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as error:
        log.warning("%s: cannot read: %s", path, error.strerror)
        return {}
    if len(raw) > MAX_STATE_BYTES:
        log.warning("%s: larger than %d bytes; ignored", path, MAX_STATE_BYTES)
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:
        log.warning("%s: not JSON; ignored", path)
        return {}
    return data if isinstance(data, dict) else {}


def _record(value: Any) -> DrillRecord | None:
    if not isinstance(value, dict):
        return None
    try:
        return DrillRecord(
            at=float(value["at"]),
            ok=bool(value["ok"]),
            seconds=float(value["seconds"]),
            backup_id=value.get("backup_id"),
            target_time=value.get("target_time"),
            error=value.get("error"),
            kept=bool(value.get("kept", False)),
            source=str(value.get("source") or "local"),
        )
    except (KeyError, TypeError, ValueError):
        return None


def last_drill(path: Path) -> DrillRecord | None:
    return _record(load_state(path).get("last_drill"))


def last_good_drill(path: Path) -> DrillRecord | None:
    return _record(load_state(path).get("last_good_drill"))


MAX_GAPS = 20


def gaps(path: Path) -> list[dict[str, Any]]:
    """Gaps in the archive, oldest first: WAL lost after ``after_wal`` until ``backup_id``."""
    found = load_state(path).get("gaps")
    return [g for g in found if isinstance(g, dict)] if isinstance(found, list) else []


def record_gap(path: Path, after_wal: str | None, detected_at: float) -> None:
    state = load_state(path)
    known = gaps(path)
    known.append({"after_wal": after_wal, "detected_at": detected_at, "backup_id": None})
    state["gaps"] = known[-MAX_GAPS:]
    write_private(path, json.dumps(state, indent=2) + "\n")


def close_gap(path: Path, backup_id: str) -> None:
    """The first base backup after a gap: recovery is possible again from its end on."""
    state = load_state(path)
    known = gaps(path)
    for gap in known:
        if gap.get("backup_id") is None:
            gap["backup_id"] = backup_id
    state["gaps"] = known
    write_private(path, json.dumps(state, indent=2) + "\n")


def record_drill(path: Path, record: DrillRecord) -> None:
    state = load_state(path)
    state["last_drill"] = asdict(record)
    if record.ok:
        state["last_good_drill"] = asdict(record)
    write_private(path, json.dumps(state, indent=2) + "\n")
