"""What ``ops pitr check`` and ``ops pitr status`` say about the off-host copies: the store
(bucket and credentials), what is still queued, and gaps in the store's WAL sequence."""

from __future__ import annotations

from typing import Any

from ops.offsite.metrics import OffsiteCounters
from ops.offsite.shipper import Shipper
from ops.offsite.store import StoreError, check
from ops.offsite.wal import SEGMENT, missing_count
from ops.settings import Settings

Check = dict[str, str]


def _shipper(settings: Settings) -> Shipper:
    from prometheus_client import CollectorRegistry

    return Shipper(settings.offsite, settings.pitr, OffsiteCounters(CollectorRegistry()))


def offsite_checks(settings: Settings) -> dict[str, Check]:
    """``dbops_offsite_store`` (bucket and credentials), ``dbops_offsite_barman_cloud`` (the
    programs are installed) and ``dbops_offsite_wal_gaps``."""
    if not settings.offsite.enabled:
        return {}
    store = check(settings.offsite)
    checks = {
        "dbops_offsite_store": {"status": "OK" if store.ok else "FAILED", "hint": store.detail}
    }
    shipper = _shipper(settings)
    program = shipper.cloud.program("wal-archive")
    checks["dbops_offsite_barman_cloud"] = (
        {"status": "OK", "hint": str(program.parent)}
        if program.is_file()
        else {"status": "FAILED", "hint": f"{program} is missing: install barman[cloud]"}
    )
    if not store.ok:
        return checks
    try:
        shipper.inspect()
    except StoreError as error:
        checks["dbops_offsite_wal_gaps"] = {"status": "FAILED", "hint": str(error)}
        return checks
    gaps = shipper.status.gaps
    checks["dbops_offsite_wal_gaps"] = (
        {
            "status": "FAILED",
            "hint": f"{missing_count(gaps)} segment(s) missing: "
            + "; ".join(str(gap) for gap in gaps[:5]),
        }
        if gaps
        else {"status": "OK", "hint": "no segment missing in the store's WAL sequence"}
    )
    return checks


def offsite_status(settings: Settings) -> dict[str, Any] | None:
    """The off-host part of ``ops pitr status`` (None when off-host copying is off)."""
    if not settings.offsite.enabled:
        return None
    shipper = _shipper(settings)
    wals = shipper.queue.wals()
    backups = shipper.queue.backups()
    state = shipper.queue.state()
    store = check(settings.offsite)
    result: dict[str, Any] = {
        "url": settings.offsite.url,
        "store_ok": store.ok,
        "store_detail": store.detail,
        "queued_wal_segments": len([w for w in wals if SEGMENT.match(w.name)]),
        "queued_wal_bytes": sum(w.size_bytes for w in wals),
        "queued_base_backups": [b.id for b in backups],
        "last_shipped_wal": state.get("last_shipped_wal"),
        "last_shipped_wal_at": state.get("last_shipped_wal_at"),
        "last_shipped_backup": state.get("last_shipped_backup"),
        "window_start": None,
        "gaps": None,
        "problems": [],
    }
    if store.ok:
        try:
            shipper.inspect()
            result["window_start"] = shipper.status.window_start
            result["gaps"] = [
                {"first": g.first_missing, "last": g.last_missing, "count": g.count}
                for g in shipper.status.gaps
            ]
        except StoreError as error:
            result["problems"].append(str(error))
    else:
        result["problems"].append(store.detail)
    return result
