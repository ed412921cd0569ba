#!/usr/bin/env python3
"""Generate the Grafana dashboards in ``dashboards/`` from the panel lists below.

Hand-edited dashboard JSON drifts: a panel loses its unit, a query keeps a metric that was
renamed. Here every panel is one line of intent (title, unit, queries) and the JSON is derived,
so each dashboard gets the same datasource, template variables and layout rules. The generated
files are committed; ``--check`` fails when they differ from what this script would write, and
tests/monitoring runs every query against a live Prometheus.

    python3 monitoring/grafana/generate_dashboards.py          # rewrite dashboards/*.json
    python3 monitoring/grafana/generate_dashboards.py --check  # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "dbops-prometheus"}
GRID_WIDTH = 24

# Selectors shared by the queries: server-side series come from the sidecar, pool series from
# every process that uses the db library; both are narrowed by the same variables.
INST = 'instance=~"$instance"'
INST_POOL = 'instance=~"$instance", pool=~"$pool"'
INST_DB = 'instance=~"$instance", datname=~"$datname"'


@dataclass
class Target:
    expr: str
    legend: str = ""
    instant: bool = False
    format: str = "time_series"


@dataclass
class Panel:
    title: str
    kind: str  # timeseries | stat | heatmap | table | bargauge
    unit: str
    targets: list[Target]
    description: str
    width: int = 12
    height: int = 8
    thresholds: list[tuple[float, str]] = field(default_factory=list)
    mappings: list[dict[str, Any]] = field(default_factory=list)
    min: float | None = None
    max: float | None = None
    stack: bool = False


@dataclass
class Row:
    title: str


def q(expr: str, legend: str = "") -> Target:
    return Target(expr, legend)


def instant(expr: str, legend: str = "", format: str = "time_series") -> Target:
    return Target(expr, legend, instant=True, format=format)


def variable(name: str, label: str, query: str, multi: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        # The plain-string form: every Grafana version reads it (and migrates it on load).
        "query": query,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if multi else {},
        "options": [],
        "hide": 0,
    }


INSTANCE = variable("instance", "Instance", 'label_values(up{job=~"dbops-.*"}, instance)')
POOL = variable("pool", "Pool", 'label_values(dbops_pool_size{instance=~"$instance"}, pool)')
DATNAME = variable(
    "datname",
    "Database",
    'label_values(dbops_pg_database_size_bytes{instance=~"$instance"}, datname)',
)

UP_MAPPING = {
    "type": "value",
    "options": {
        "0": {"text": "DOWN", "color": "red", "index": 0},
        "1": {"text": "UP", "color": "green", "index": 1},
    },
}
BUSY_MAPPING = {
    "type": "value",
    "options": {
        "0": {"text": "idle", "color": "green", "index": 0},
        "1": {"text": "running", "color": "blue", "index": 1},
    },
}


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    steps += [{"color": color, "value": value} for value, color in panel.thresholds]
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "thresholds": {"mode": "absolute", "steps": steps},
        "mappings": panel.mappings,
    }
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.max is not None:
        defaults["max"] = panel.max
    options: dict[str, Any] = {}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stack else 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "line" if panel.thresholds else "off"},
        }
        options = {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "calcs": ["lastNotNull", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif panel.kind == "stat":
        defaults["color"] = {"mode": "thresholds"}
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background" if panel.thresholds or panel.mappings else "value",
            "graphMode": "none",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        }
    elif panel.kind == "bargauge":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "displayMode": "basic",
            "orientation": "horizontal",
            "showUnfilled": True,
        }
    elif panel.kind == "heatmap":
        options = {
            "calculate": False,
            "yAxis": {"axisPlacement": "left", "unit": panel.unit},
            "rowsFrame": {"layout": "le"},
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "cellGap": 1,
            "tooltip": {"show": True, "yHistogram": True},
            "legend": {"show": True},
        }
    elif panel.kind == "table":
        options = {"showHeader": True, "sortBy": [{"displayName": "Value", "desc": True}]}
    targets = []
    for index, target in enumerate(panel.targets):
        targets.append(
            {
                "refId": chr(ord("A") + index),
                "datasource": DATASOURCE,
                "expr": target.expr,
                "legendFormat": target.legend or "__auto",
                "instant": target.instant,
                "range": not target.instant,
                "format": "heatmap" if panel.kind == "heatmap" else target.format,
            }
        )
    result: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }
    if panel.kind == "table":
        hidden = {"Time": True, "__name__": True, "job": True}
        result["transformations"] = [{"id": "organize", "options": {"excludeByName": hidden}}]
    return result


def dashboard(
    uid: str, title: str, description: str, variables: list[dict[str, Any]], items: list[Any]
) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    x = y = row_height = 0
    for number, item in enumerate(items, start=1):
        if isinstance(item, Row):
            if x:
                x, y = 0, y + row_height
            panels.append(
                {
                    "id": number,
                    "type": "row",
                    "title": item.title,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                    "panels": [],
                }
            )
            y, row_height = y + 1, 0
            continue
        if x + item.width > GRID_WIDTH:
            x, y, row_height = 0, y + row_height, 0
        panels.append(panel_json(item, number, x, y))
        x += item.width
        row_height = max(row_height, item.height)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["dbops"],
        "timezone": "utc",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "links": [
            {
                "type": "dashboards",
                "tags": ["dbops"],
                "title": "dbops",
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "annotations": {"list": []},
        "templating": {"list": variables},
        "panels": panels,
    }


def overview() -> dict[str, Any]:
    return dashboard(
        "dbops-overview",
        "dbops / Overview",
        "Is the database up, is it keeping up, is it backed up.",
        [INSTANCE, POOL],
        [
            Panel("PostgreSQL", "stat", "none", [instant(f"min(dbops_pg_up{{{INST}}})")],
                  "The sidecar's probe query succeeds (dbops_pg_up).", width=3, height=4,
                  mappings=[UP_MAPPING]),
            Panel("Sidecar", "stat", "none",
                  [instant(f'min(up{{job="dbops-sidecar", {INST}}})')],
                  "Prometheus can scrape the sidecar.", width=3, height=4, mappings=[UP_MAPPING]),
            Panel("Server connections used", "stat", "percentunit",
                  [instant(f"max(instance:dbops_pg_connections:saturation_ratio{{{INST}}})")],
                  "Connections / (max_connections - reserved). Alerts at 80% and 95%.",
                  width=3, height=4, thresholds=[(0.8, "orange"), (0.95, "red")]),
            Panel("Transactions", "stat", "ops",
                  [instant(f"sum(datname:dbops_pg_transactions:rate5m{{{INST}}})")],
                  "Commits + rollbacks per second over 5 minutes, all databases.",
                  width=3, height=4),
            Panel("Worst query p95", "stat", "s",
                  [instant(f"max(pool_operation:dbops_query_duration_seconds:p95_5m{{{INST_POOL}}})")],
                  "Highest p95 of any pool and operation; the target is 100 ms.",
                  width=3, height=4, thresholds=[(0.1, "red")]),
            Panel("Database size", "stat", "bytes",
                  [instant(f"sum(dbops_pg_database_size_bytes{{{INST}}})")],
                  "All databases on the server.", width=3, height=4),
            Panel("Last good backup", "stat", "s",
                  [instant(f"max(instance:dbops_backup_age_seconds{{{INST}}})")],
                  "Age of the newest successful backup; DbopsBackupStale fires past "
                  "BACKUP_MAX_AGE.", width=3, height=4, thresholds=[(93600, "red")]),
            Panel("Firing alerts", "stat", "none",
                  [instant('count(ALERTS{alertstate="firing", severity="critical"}) or vector(0)',
                           "critical"),
                   instant('count(ALERTS{alertstate="firing", severity="warning"}) or vector(0)',
                           "warning")],
                  "Alerts firing now, by severity; details in Alertmanager.", width=3, height=4,
                  thresholds=[(1, "red")]),
            Panel("Pool utilisation", "timeseries", "percentunit",
                  [q(f"pool:dbops_pool_utilisation:ratio{{{INST_POOL}}}", "{{pool}} {{instance}}")],
                  "Checked out / (pool_size + max_overflow). DbopsPoolSaturated above 90% for 5m.",
                  thresholds=[(0.9, "red")], min=0, max=1),
            Panel("Server connection saturation", "timeseries", "percentunit",
                  [q(f"instance:dbops_pg_connections:saturation_ratio{{{INST}}}", "{{instance}}")],
                  "Server connections over usable connections.",
                  thresholds=[(0.8, "orange"), (0.95, "red")], min=0, max=1),
            Panel("Transactions per second", "timeseries", "ops",
                  [q(f"datname:dbops_pg_transactions:rate5m{{{INST}}}", "{{datname}}")],
                  "Commits + rollbacks per second, by database."),
            Panel("Query p95 by pool and operation", "timeseries", "s",
                  [q(f"pool_operation:dbops_query_duration_seconds:p95_5m{{{INST_POOL}}}",
                     "{{pool}} {{operation}}")],
                  "DbopsSlowQueries fires when one stays above 100 ms for 10 minutes.",
                  thresholds=[(0.1, "red")]),
            Panel("Database size", "timeseries", "bytes",
                  [q(f"dbops_pg_database_size_bytes{{{INST}}}", "{{datname}}")],
                  "Size of each database."),
            Panel("Backup age against BACKUP_MAX_AGE", "timeseries", "s",
                  [q(f"instance:dbops_backup_age_seconds{{{INST}}}", "age {{instance}}"),
                   q(f"dbops_backup_max_age_seconds{{{INST}}}", "max age {{instance}}")],
                  "Stale when the age line crosses the max age line."),
        ],
    )  # fmt: skip


def pools() -> dict[str, Any]:
    return dashboard(
        "dbops-pools",
        "dbops / Connection pools",
        "Client pools (db library) and the server connections they add up to.",
        [INSTANCE, POOL],
        [
            Row("Client pools"),
            Panel("Pool utilisation", "timeseries", "percentunit",
                  [q(f"pool:dbops_pool_utilisation:ratio{{{INST_POOL}}}", "{{pool}} {{instance}}")],
                  "Checked out / (pool_size + max_overflow); warning above 90% for 5 minutes.",
                  thresholds=[(0.9, "red")], min=0, max=1),
            Panel("Connections by pool", "timeseries", "short",
                  [q(f"dbops_pool_checked_out{{{INST_POOL}}}", "checked out {{pool}}"),
                   q(f"dbops_pool_idle{{{INST_POOL}}}", "idle {{pool}}"),
                   q(f"dbops_pool_overflow{{{INST_POOL}}}", "overflow {{pool}}"),
                   q(f"dbops_pool_size{{{INST_POOL}}} + dbops_pool_max_overflow{{{INST_POOL}}}",
                     "capacity {{pool}}")],
                  "What the pool holds now against its capacity."),
            Panel("Waiting checkouts", "timeseries", "short",
                  [q(f"dbops_pool_waiting{{{INST_POOL}}}", "{{pool}} {{instance}}")],
                  "Threads blocked waiting for a connection; any for minutes means saturation."),
            Panel("Checkout wait time", "heatmap", "s",
                  [q(f"sum by (le) (increase(dbops_pool_wait_seconds_bucket{{{INST_POOL}}}"
                     "[$__rate_interval]))", "{{le}}")],
                  "How long checkouts took to get a connection (dbops_pool_wait_seconds)."),
            Panel("Checkout wait p95", "timeseries", "s",
                  [q("histogram_quantile(0.95, sum by (instance, pool, le) "
                     f"(rate(dbops_pool_wait_seconds_bucket{{{INST_POOL}}}[5m])))",
                     "{{pool}} {{instance}}")],
                  "95th percentile of checkout time over 5 minutes."),
            Panel("Pool timeouts (per 5 min)", "timeseries", "short",
                  [q(f"increase(dbops_pool_timeouts_total{{{INST_POOL}}}[5m])",
                     "{{pool}} {{instance}}")],
                  "Checkouts that gave up after DB_POOL_TIMEOUT; DbopsPoolTimeouts is critical.",
                  thresholds=[(1, "red")]),
            Panel("Connects, invalidations, connect errors (per 5 min)", "timeseries", "short",
                  [q(f"increase(dbops_pool_connects_total{{{INST_POOL}}}[5m])",
                     "connects {{pool}}"),
                   q(f"increase(dbops_pool_invalidations_total{{{INST_POOL}}}[5m])",
                     "invalidations {{pool}}"),
                   q(f"increase(dbops_pool_connect_errors_total{{{INST_POOL}}}[5m])",
                     "connect errors {{pool}}")],
                  "Churn: new connections (recycle, pre-ping failures) and failed connects."),
            Row("Server connections"),
            Panel("Server connections by application and state", "timeseries", "short",
                  [q(f"sum by (application_name, state) (dbops_pg_connections{{{INST}}})",
                     "{{application_name}} {{state}}")],
                  "pg_stat_activity client backends; application_name is the pool name.",
                  stack=True),
            Panel("Server connection saturation", "timeseries", "percentunit",
                  [q(f"instance:dbops_pg_connections:saturation_ratio{{{INST}}}", "{{instance}}")],
                  "Connections / (max_connections - reserved); 80% warns, 95% is critical.",
                  thresholds=[(0.8, "orange"), (0.95, "red")], min=0, max=1),
            Panel("Idle in transaction", "timeseries", "short",
                  [q(f"dbops_pg_idle_in_transaction_connections{{{INST}}}", "{{instance}}")],
                  "Connections holding a transaction open while doing nothing."),
            Panel("Connection limits", "stat", "short",
                  [instant(f"max(dbops_pg_max_connections{{{INST}}})", "max_connections"),
                   instant(f"max(dbops_pg_reserved_connections{{{INST}}})", "reserved")],
                  "The server's limits the saturation ratio is computed from."),
        ],
    )  # fmt: skip


def queries() -> dict[str, Any]:
    return dashboard(
        "dbops-queries",
        "dbops / Queries",
        "Latency as the clients see it, and the statements the server spends its time on.",
        [INSTANCE, POOL],
        [
            Row("Client latency (db library)"),
            Panel("Query p95 by operation", "timeseries", "s",
                  [q(f"pool_operation:dbops_query_duration_seconds:p95_5m{{{INST_POOL}}}",
                     "{{pool}} {{operation}}")],
                  "DbopsSlowQueries fires above 100 ms for 10 minutes.",
                  thresholds=[(0.1, "red")]),
            Panel("Query p50 and p99 by operation", "timeseries", "s",
                  [q(f"pool_operation:dbops_query_duration_seconds:p50_5m{{{INST_POOL}}}",
                     "p50 {{pool}} {{operation}}"),
                   q(f"pool_operation:dbops_query_duration_seconds:p99_5m{{{INST_POOL}}}",
                     "p99 {{pool}} {{operation}}")],
                  "Median and tail latency; a wide gap points at a few slow statements."),
            Panel("Queries per second by operation", "timeseries", "ops",
                  [q("sum by (pool, operation) "
                     f"(rate(dbops_query_duration_seconds_count{{{INST_POOL}}}[$__rate_interval]))",
                     "{{pool}} {{operation}}")],
                  "Statements executed through each pool."),
            Panel("Query errors per second", "timeseries", "ops",
                  [q("sum by (pool, operation) "
                     f"(rate(dbops_query_errors_total{{{INST_POOL}}}[$__rate_interval]))",
                     "{{pool}} {{operation}}")],
                  "Statements that raised (constraint violations, timeouts, deadlocks)."),
            Row("Server"),
            Panel("Transactions per second", "timeseries", "ops",
                  [q(f"datname:dbops_pg_transactions:rate5m{{{INST}}}", "{{datname}}")],
                  "Commits + rollbacks per second."),
            Panel("Rollback ratio", "timeseries", "percentunit",
                  [q(f"datname:dbops_pg_xact_rollback:ratio_rate5m{{{INST}}}", "{{datname}}")],
                  "Share of transactions rolled back.", min=0, max=1),
            Panel("Cache hit ratio", "timeseries", "percentunit",
                  [q(f"datname:dbops_pg_blks_hit:ratio_rate5m{{{INST}}}", "{{datname}}")],
                  "Block reads served from shared buffers; below ~99% on a hot set needs memory.",
                  min=0, max=1),
            Panel("Longest open transaction", "timeseries", "s",
                  [q(f"dbops_pg_longest_transaction_seconds{{{INST}}}", "{{instance}}")],
                  "DbopsLongTransaction fires above 5 minutes.", thresholds=[(300, "red")]),
            Panel("Deadlocks (per 10 min)", "timeseries", "short",
                  [q(f"increase(dbops_pg_deadlocks_total{{{INST}}}[10m])", "{{datname}}")],
                  "Transactions aborted to break deadlocks.", thresholds=[(1, "red")]),
            Row("Top statements (pg_stat_statements)"),
            Panel("Top statements by total time", "table", "s",
                  [instant(f"topk(10, rate(dbops_pg_statement_seconds_total{{{INST}}}[5m]))",
                           format="table")],
                  "Execution seconds per second over 5 minutes: where the server's time goes.",
                  width=24),
            Panel("Top statements by calls", "table", "ops",
                  [instant(f"topk(10, rate(dbops_pg_statement_calls_total{{{INST}}}[5m]))",
                           format="table")],
                  "Calls per second over 5 minutes.", width=12),
            Panel("Mean time per call of the busiest statements", "table", "s",
                  [instant(f"topk(10, rate(dbops_pg_statement_seconds_total{{{INST}}}[5m]) / "
                           f"(rate(dbops_pg_statement_calls_total{{{INST}}}[5m]) > 0))",
                           format="table")],
                  "Seconds per call over 5 minutes.", width=12),
        ],
    )  # fmt: skip


def storage() -> dict[str, Any]:
    return dashboard(
        "dbops-storage",
        "dbops / Storage",
        "How big, how fast it grows, what takes the space, which indexes are dead weight.",
        [INSTANCE, DATNAME],
        [
            Panel("Database size", "timeseries", "bytes",
                  [q(f"dbops_pg_database_size_bytes{{{INST_DB}}}", "{{datname}}")],
                  "pg_database_size of each database."),
            Panel("Growth per day", "timeseries", "bytes",
                  [q(f"datname:dbops_pg_database_size_bytes:growth_per_day_6h{{{INST_DB}}}",
                     "{{datname}}"),
                   q("dbops:database_growth_threshold_bytes_per_day", "alert threshold")],
                  "Least-squares slope over 6 hours, in bytes per day; DbopsDatabaseGrowth "
                  "fires above the threshold for an hour."),
            Panel("Largest tables", "bargauge", "bytes",
                  [instant(f"topk(10, dbops_pg_table_size_bytes{{{INST_DB}}})",
                           "{{schema}}.{{table}}")],
                  "Top tables by size (heap + TOAST); the remainder series sums the rest."),
            Panel("Largest indexes", "bargauge", "bytes",
                  [instant(f"topk(10, dbops_pg_index_size_bytes{{{INST_DB}}})",
                           "{{schema}}.{{index}}")],
                  "Top indexes by size; the remainder series sums the rest."),
            Panel("Table sizes", "timeseries", "bytes",
                  [q(f"topk(10, dbops_pg_table_size_bytes{{{INST_DB}}})", "{{schema}}.{{table}}")],
                  "Which tables grow."),
            Panel("Index scans per second", "timeseries", "ops",
                  [q(f"topk(10, rate(dbops_pg_index_scans_total{{{INST_DB}}}[$__rate_interval]))",
                     "{{schema}}.{{index}}")],
                  "Indexes the planner uses; one never seen here costs writes for nothing."),
            Panel("Unused indexes", "stat", "short",
                  [instant(f"sum(dbops_pg_unused_indexes{{{INST_DB}}})")],
                  "Indexes with no scans since statistics were reset (not unique, not primary).",
                  width=6, height=6, thresholds=[(1, "orange")]),
        ],
    )  # fmt: skip


def backups() -> dict[str, Any]:
    return dashboard(
        "dbops-backups",
        "dbops / Backups",
        "Whether there is a recent, verified backup, and how the runs went.",
        [INSTANCE],
        [
            Panel("Last good backup", "stat", "s",
                  [instant(f"max(instance:dbops_backup_age_seconds{{{INST}}})")],
                  "Age of the newest successful backup.", width=4, height=4),
            Panel("Last verified restore", "stat", "s",
                  [instant(f"max(instance:dbops_backup_verify_age_seconds{{{INST}}})")],
                  "Age of the newest successful restore verification.", width=4, height=4),
            Panel("BACKUP_MAX_AGE", "stat", "s",
                  [instant(f"max(dbops_backup_max_age_seconds{{{INST}}})")],
                  "The configured age past which DbopsBackupStale fires.", width=4, height=4),
            Panel("Next scheduled backup in", "stat", "s",
                  [instant(f"max(dbops_backup_next_run_timestamp_seconds{{{INST}}}) - time()")],
                  "From BACKUP_SCHEDULE.", width=4, height=4),
            Panel("Retained backups", "stat", "short",
                  [instant(f"sum(dbops_backup_retained{{{INST}}})")],
                  "Backups kept by the retention policy.", width=4, height=4),
            Panel("Backup running", "stat", "none",
                  [instant(f"max(dbops_backup_in_progress{{{INST}}})")],
                  "1 while a backup runs.", width=4, height=4, mappings=[BUSY_MAPPING]),
            Panel("Backup age against BACKUP_MAX_AGE", "timeseries", "s",
                  [q(f"instance:dbops_backup_age_seconds{{{INST}}}", "backup age"),
                   q(f"dbops_backup_max_age_seconds{{{INST}}}", "BACKUP_MAX_AGE")],
                  "DbopsBackupStale fires when the age crosses the max age."),
            Panel("Verification age against its limit", "timeseries", "s",
                  [q(f"instance:dbops_backup_verify_age_seconds{{{INST}}}", "verify age"),
                   q(f"2 * dbops_backup_max_age_seconds{{{INST}}}", "limit (2 x BACKUP_MAX_AGE)")],
                  "DbopsBackupVerifyStale fires when the age crosses the limit."),
            Panel("Runs by result (per hour)", "timeseries", "short",
                  [q(f"sum by (result) (increase(dbops_backup_runs_total{{{INST}}}[1h]))",
                     "{{result}}")],
                  "Backup runs of the sidecar's scheduler by result."),
            Panel("Last backup size", "timeseries", "bytes",
                  [q(f"dbops_backup_last_size_bytes{{{INST}}}", "{{instance}}")],
                  "Size of the newest good backup; a sudden drop deserves a look."),
            Panel("Last backup duration", "timeseries", "s",
                  [q(f"dbops_backup_last_duration_seconds{{{INST}}}", "{{instance}}")],
                  "How long the newest good backup took."),
        ],
    )  # fmt: skip


# A drill's last result: 1 proved its recovery point, 0 failed.
DRILL_MAPPING = {
    "type": "value",
    "options": {
        "0": {"text": "FAILED", "color": "red", "index": 0},
        "1": {"text": "OK", "color": "green", "index": 1},
    },
}
# Off-host panels read dbops_offsite_*, which exist only where an off-host store is configured
# (OFFSITE_S3_URL); their titles start with this, and the live tests hold them to it.
OFFSITE = "Off-host"


def recovery() -> dict[str, Any]:
    return dashboard(
        "dbops-recovery",
        "dbops / Recovery",
        "Point-in-time recovery: the window one can recover into, on this host and off it, how "
        "far WAL streaming trails, the slot against its cap, base backups and the drill.",
        [INSTANCE],
        [
            Row("Recoverable window"),
            Panel("Local window: earliest point", "stat", "dateTimeAsIso",
                  [instant(f"max(dbops_pitr_recovery_window_start_timestamp_seconds{{{INST}}} > 0)"
                           " * 1000")],
                  "The end of the oldest base backup in PITR_DIR: nothing before it can be "
                  "recovered here.", width=6, height=4),
            Panel("Local window: latest point", "stat", "dateTimeAsIso",
                  [instant(f"max(dbops_pitr_wal_last_archived_timestamp_seconds{{{INST}}} > 0)"
                           " * 1000")],
                  "When the newest WAL segment in the archive was closed: `--target latest` "
                  "reaches at least this far.", width=6, height=4),
            Panel(f"{OFFSITE} window: earliest point", "stat", "dateTimeAsIso",
                  [instant("max(dbops_offsite_recovery_window_start_timestamp_seconds"
                           f"{{{INST}}} > 0) * 1000")],
                  "The oldest base backup in the object store: the earliest point a recovery "
                  "from off the host can reach.", width=6, height=4),
            Panel(f"{OFFSITE} window: latest point", "stat", "dateTimeAsIso",
                  [instant(f"max(dbops_offsite_wal_last_shipped_timestamp_seconds{{{INST}}} > 0)"
                           " * 1000")],
                  "The newest WAL segment shipped to the object store.", width=6, height=4),
            Panel("Local window length", "timeseries", "s",
                  [q(f"dbops_pitr_wal_last_archived_timestamp_seconds{{{INST}}}"
                     f" - dbops_pitr_recovery_window_start_timestamp_seconds{{{INST}}} > 0",
                     "{{instance}}")],
                  "How far back one can recover on this host (about PITR_RETENTION once "
                  "the window has filled)."),
            Panel(f"{OFFSITE} window length", "timeseries", "s",
                  [q(f"dbops_offsite_wal_last_shipped_timestamp_seconds{{{INST}}}"
                     f" - dbops_offsite_recovery_window_start_timestamp_seconds{{{INST}}} > 0",
                     "{{instance}}")],
                  "How far back one can recover from the object store."),
            Row("WAL streaming"),
            Panel("WAL streaming", "stat", "none",
                  [instant(f"min(dbops_pitr_streaming_up{{{INST}}})")],
                  "pg_receivewal streams through the slot; DbopsWalStreamingDown fires when "
                  "not.", width=4, height=4, mappings=[UP_MAPPING]),
            Panel("Slot status", "stat", "none",
                  [instant(f"dbops_pitr_slot_status{{{INST}}} == 1", "{{wal_status}}")],
                  "The slot's wal_status: reserved is normal; lost means WAL was dropped "
                  "(DbopsWalSlotLost).", width=4, height=4),
            Panel("Newest archived WAL age", "stat", "s",
                  [instant(f"time() - max(dbops_pitr_wal_last_archived_timestamp_seconds"
                           f"{{{INST}}} > 0)")],
                  "Since the newest archived segment was closed; with writes it stays under "
                  "PITR_ARCHIVE_TIMEOUT, without writes it grows (nothing to switch out).",
                  width=4, height=4),
            Panel("Slot retained / cap", "stat", "percentunit",
                  [instant(f"max(dbops_pitr_slot_retained_bytes{{{INST}}}"
                           f" / dbops_pitr_slot_max_retained_bytes{{{INST}}})")],
                  "WAL the server holds for the slot, as a share of max_slot_wal_keep_size; "
                  "DbopsWalSlotRetentionHigh fires past 50 %.", width=4, height=4,
                  thresholds=[(0.5, "orange"), (0.9, "red")], min=0, max=1),
            Panel("Failing barman check items", "stat", "short",
                  [instant(f"max(dbops_pitr_check_failures{{{INST}}})")],
                  "How many `barman check` items fail (`ops pitr check` names them).",
                  width=4, height=4, thresholds=[(1, "red")]),
            Panel("Which barman checks fail", "table", "short",
                  [instant(f"max by (check) (dbops_pitr_check_failed{{{INST}}})", "{{check}}",
                           format="table")],
                  "One row per failing item; empty when every check passes.",
                  width=4, height=4),
            Panel("WAL lag (bytes)", "timeseries", "bytes",
                  [q(f"dbops_pitr_wal_lag_bytes{{{INST}}}", "{{instance}}")],
                  "WAL the server wrote that streaming has not yet flushed."),
            Panel("WAL lag (seconds)", "timeseries", "s",
                  [q(f"dbops_pitr_wal_lag_seconds{{{INST}}}", "flush lag {{instance}}"),
                   q(f"time() - dbops_pitr_wal_last_archived_timestamp_seconds{{{INST}}} > 0",
                     "archive age {{instance}}")],
                  "Streaming's flush lag as the server measures it, and how old the newest "
                  "archived segment is (what `--target latest` could lose in a crash)."),
            Panel("Slot retained WAL against the cap", "timeseries", "bytes",
                  [q(f"dbops_pitr_slot_retained_bytes{{{INST}}}", "retained {{instance}}"),
                   q(f"dbops_pitr_slot_max_retained_bytes{{{INST}}}", "cap"),
                   q(f"0.5 * dbops_pitr_slot_max_retained_bytes{{{INST}}}", "alert (50 %)")],
                  "Past the cap the server drops the slot's WAL and the archive has a gap.",
                  width=24),
            Row("Base backups"),
            Panel("Newest base backup age", "stat", "s",
                  [instant(f"time() - max(dbops_pitr_base_backup_last_success_timestamp_seconds"
                           f"{{{INST}}} > 0)")],
                  "DbopsBaseBackupStale fires past twice PITR_BASEBACKUP_SCHEDULE's interval.",
                  width=6, height=4),
            Panel("Base backups retained", "stat", "short",
                  [instant(f"sum(dbops_pitr_base_backups_retained{{{INST}}})")],
                  "Good base backups Barman keeps (the recovery window and PITR_MIN_REDUNDANCY, "
                  "plus the one the last good drill proved).", width=6, height=4),
            Panel("Base backup running", "stat", "none",
                  [instant(f"max(dbops_pitr_base_backup_in_progress{{{INST}}})")],
                  "1 while a base backup runs.", width=6, height=4, mappings=[BUSY_MAPPING]),
            Panel("Base backup interval", "stat", "s",
                  [instant(f"max(dbops_pitr_base_backup_interval_seconds{{{INST}}})")],
                  "PITR_BASEBACKUP_SCHEDULE as an interval.", width=6, height=4),
            Panel("Base backup age against its limit", "timeseries", "s",
                  [q(f"time() - dbops_pitr_base_backup_last_success_timestamp_seconds{{{INST}}}"
                     " > 0", "age {{instance}}"),
                   q(f"2 * dbops_pitr_base_backup_interval_seconds{{{INST}}}",
                     "limit (2 x interval)")],
                  "DbopsBaseBackupStale fires when the age crosses the limit.", width=8),
            Panel("Base backup duration", "timeseries", "s",
                  [q(f"dbops_pitr_base_backup_last_duration_seconds{{{INST}}}", "{{instance}}")],
                  "How long the newest good base backup took.", width=8),
            Panel("Base backup size", "timeseries", "bytes",
                  [q(f"dbops_pitr_base_backup_last_size_bytes{{{INST}}}", "{{instance}}")],
                  "Size of the newest good base backup.", width=8),
            Row("PITR drill"),
            Panel("Last drill", "stat", "none",
                  [instant(f"min(dbops_pitr_drill_last_ok{{{INST}}})")],
                  "Whether the last drill found exactly the rows committed before its target "
                  "(DbopsPitrDrillFailed).", width=6, height=4, mappings=[DRILL_MAPPING]),
            Panel("Last drill duration (RTO)", "stat", "s",
                  [instant(f"max(dbops_pitr_drill_last_duration_seconds{{{INST}}})")],
                  "Restore, replay to the target and checks: the measured recovery time.",
                  width=6, height=4),
            Panel("Last successful drill age", "stat", "s",
                  [instant(f"time() - max(dbops_pitr_drill_last_success_timestamp_seconds"
                           f"{{{INST}}} > 0)")],
                  "DbopsPitrDrillStale fires past twice PITR_DRILL_SCHEDULE's interval.",
                  width=6, height=4),
            Panel("Drill interval", "stat", "s",
                  [instant(f"max(dbops_pitr_drill_interval_seconds{{{INST}}})")],
                  "PITR_DRILL_SCHEDULE as an interval.", width=6, height=4),
            Panel("Drill duration", "timeseries", "s",
                  [q(f"dbops_pitr_drill_last_duration_seconds{{{INST}}}", "{{instance}}")],
                  "The recovery time each drill measured."),
            Panel("Successful drill age against its limit", "timeseries", "s",
                  [q(f"time() - dbops_pitr_drill_last_success_timestamp_seconds{{{INST}}} > 0",
                     "age {{instance}}"),
                   q(f"2 * dbops_pitr_drill_interval_seconds{{{INST}}}", "limit (2 x interval)")],
                  "DbopsPitrDrillStale fires when the age crosses the limit."),
            Row(f"{OFFSITE} copies"),
            Panel(f"{OFFSITE} WAL lag", "timeseries", "s",
                  [q(f"dbops_offsite_wal_lag_seconds{{{INST}}}", "{{instance}}")],
                  "How far the object store's newest WAL trails the local archive "
                  "(DbopsOffsiteLag)."),
            Panel(f"{OFFSITE} upload queue", "timeseries", "short",
                  [q(f"dbops_offsite_queue_files{{{INST}}}", "{{what}}")],
                  "Files waiting to be shipped, by kind (wal, basebackup, dump)."),
        ],
    )  # fmt: skip


DASHBOARDS = {
    "overview.json": overview,
    "connection-pools.json": pools,
    "queries.json": queries,
    "storage.json": storage,
    "backups.json": backups,
    "recovery.json": recovery,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON files are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = OUT / name
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("stale dashboards (run generate_dashboards.py):", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
