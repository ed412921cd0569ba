"""``ops pitr check``: Barman's own checks, plus what Barman does not look at but we rely on."""

from __future__ import annotations

from ops.pitr.barman import BarmanError
from ops.pitr.status import PitrStatus, server_state
from ops.settings import Settings

Check = dict[str, str]


def our_checks(status: PitrStatus) -> dict[str, Check]:
    """Checks on the server side of streaming, from a gathered status (pure)."""
    checks: dict[str, Check] = {}
    if status.current_lsn is None:
        reason = status.problems[0] if status.problems else "no answer"
        return {"dbops_server": {"status": "FAILED", "hint": reason}}
    checks["dbops_slot_cap"] = (
        {"status": "OK", "hint": f"max_slot_wal_keep_size {status.cap_bytes // 1024**2}MB"}
        if status.cap_bytes is not None
        else {
            "status": "FAILED",
            "hint": "max_slot_wal_keep_size is unlimited: a stopped sidecar can fill the disk",
        }
    )
    slot = status.slot
    if slot is None or not slot.exists:
        checks["dbops_slot"] = {"status": "FAILED", "hint": "replication slot missing"}
    elif slot.wal_status == "lost":
        checks["dbops_slot"] = {
            "status": "FAILED",
            "hint": f"slot {slot.name} lost its WAL: the archive has a gap",
        }
    else:
        checks["dbops_slot"] = {"status": "OK", "hint": f"{slot.name}: {slot.wal_status}"}
    return checks


def run_checks(settings: Settings) -> dict[str, Check]:
    from ops.pitr.barman import make_barman
    from ops.pitr.service import pitr_engine

    barman = make_barman(settings)
    checks: dict[str, Check] = {}
    try:
        barman.prepare()
        checks.update(barman.check())
    except (BarmanError, OSError) as error:
        checks["barman"] = {"status": "FAILED", "hint": str(error)}
    engine = pitr_engine(settings)
    try:
        status = PitrStatus(gathered_at=0.0)
        server_state(engine, settings.pitr, status)
    finally:
        engine.dispose()
    checks.update(our_checks(status))
    from ops.offsite.report import offsite_checks

    checks.update(offsite_checks(settings))
    return checks
