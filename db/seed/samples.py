"""A few sample workflows and tasks, so a fresh platform has something to show.

Ids are ``uuid5`` of a fixed name, so a re-run finds the same rows. What the seed describes
(titles, definitions, assignments) is kept in step; what the platform changes as work happens
(status, timings, results) is only set when the row is first created.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, null, select
from sqlalchemy.engine import Connection

from db.models import Task, User, Workflow
from db.seed.agents import agent_ids
from db.seed.upsert import UpsertCounts, upsert

SEED_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://agent-lightning.dev/dbops/seed")
WORKFLOWS_TABLE: Table = Workflow.__table__  # type: ignore[assignment]
TASKS_TABLE: Table = Task.__table__  # type: ignore[assignment]
WORKFLOW_SEEDED = ("name", "description", "definition")
TASK_SEEDED = ("workflow_id", "agent_id", "title", "description", "priority", "input")


def seed_id(kind: str, name: str) -> uuid.UUID:
    return uuid.uuid5(SEED_NAMESPACE, f"{kind}:{name}")


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


SAMPLE_WORKFLOWS: tuple[dict[str, Any], ...] = (
    {
        "name": "onboard-service-database",
        "description": "Give a new platform service its schema, role and dashboards.",
        "status": "running",
        "definition": {
            "version": 1,
            "steps": [
                {"id": "plan", "agent": "planner"},
                {"id": "migration", "agent": "coder", "after": ["plan"]},
                {"id": "review", "agent": "reviewer", "after": ["migration"]},
                {"id": "tests", "agent": "tester", "after": ["migration"]},
                {"id": "runbook", "agent": "doc-writer", "after": ["review", "tests"]},
            ],
        },
        "started_at": _at("2026-11-20T09:00:00"),
    },
    {
        "name": "weekly-dependency-audit",
        "description": "Audit every service's dependencies and file findings above medium.",
        "status": "active",
        "definition": {
            "version": 1,
            "schedule": "0 6 * * 1",
            "steps": [
                {"id": "audit", "agent": "security-auditor"},
                {"id": "summarise", "agent": "knowledge-curator", "after": ["audit"]},
            ],
        },
    },
    {
        "name": "replica-lag-postmortem",
        "description": "Postmortem of the replica lag incident: timeline, cause, follow-ups.",
        "status": "completed",
        "definition": {
            "version": 1,
            "steps": [
                {"id": "timeline", "agent": "ops-sre"},
                {"id": "analysis", "agent": "data-analyst", "after": ["timeline"]},
                {"id": "writeup", "agent": "doc-writer", "after": ["analysis"]},
            ],
        },
        "started_at": _at("2026-11-12T14:30:00"),
        "completed_at": _at("2026-11-13T11:05:00"),
    },
)

SAMPLE_TASKS: tuple[dict[str, Any], ...] = (
    {
        "key": "onboard/plan",
        "workflow": "onboard-service-database",
        "agent": "planner",
        "title": "Plan the schema and role for the billing service",
        "priority": 5,
        "status": "completed",
        "input": {"service": "billing", "tables": ["invoices", "payments"]},
        "result": {"steps": 5, "estimate_hours": 6},
        "attempts": 1,
        "started_at": _at("2026-11-20T09:00:00"),
        "completed_at": _at("2026-11-20T09:04:12"),
    },
    {
        "key": "onboard/migration",
        "workflow": "onboard-service-database",
        "agent": "coder",
        "title": "Write the Alembic revision for billing tables",
        "priority": 5,
        "status": "running",
        "input": {"service": "billing", "branch": "billing-schema"},
        "attempts": 1,
        "started_at": _at("2026-11-20T09:05:00"),
    },
    {
        "key": "onboard/tests",
        "workflow": "onboard-service-database",
        "agent": "tester",
        "title": "Integration tests for the billing migration",
        "priority": 4,
        "status": "queued",
        "input": {"service": "billing", "suite": "integration"},
    },
    {
        "key": "onboard/review",
        "workflow": "onboard-service-database",
        "agent": "reviewer",
        "title": "Review the billing migration pull request",
        "priority": 4,
        "status": "pending",
        "input": {"service": "billing"},
    },
    {
        "key": "audit/run",
        "workflow": "weekly-dependency-audit",
        "agent": "security-auditor",
        "title": "Audit Python dependencies of all services",
        "priority": 3,
        "status": "failed",
        "input": {"ecosystems": ["pypi"], "severity_threshold": "medium"},
        "error": "advisory database download timed out after 120s",
        "attempts": 3,
        "started_at": _at("2026-11-23T06:00:00"),
        "completed_at": _at("2026-11-23T06:06:31"),
    },
    {
        "key": "postmortem/timeline",
        "workflow": "replica-lag-postmortem",
        "agent": "ops-sre",
        "title": "Build the incident timeline from alerts and logs",
        "priority": 6,
        "status": "completed",
        "input": {"incident": "INC-2041"},
        "result": {"events": 37},
        "attempts": 1,
        "started_at": _at("2026-11-12T14:30:00"),
        "completed_at": _at("2026-11-12T15:10:45"),
    },
    {
        "key": "postmortem/analysis",
        "workflow": "replica-lag-postmortem",
        "agent": "data-analyst",
        "title": "Correlate replica lag with WAL volume and long transactions",
        "priority": 6,
        "status": "completed",
        "input": {"incident": "INC-2041", "window_hours": 6},
        "result": {"cause": "a 40-minute reporting transaction held back replay"},
        "attempts": 1,
        "started_at": _at("2026-11-12T15:15:00"),
        "completed_at": _at("2026-11-12T17:02:10"),
    },
    {
        "key": "adhoc/kb-dedup",
        "workflow": None,
        "agent": "knowledge-curator",
        "title": "Merge duplicate knowledge entries about connection pool sizing",
        "priority": 1,
        "status": "pending",
        "input": {"category": "runbook", "tag": "connection-pool"},
    },
)

_TASK_RUNTIME = ("status", "result", "error", "attempts", "started_at", "completed_at")


def seed_samples(connection: Connection, admin_username: str) -> tuple[UpsertCounts, UpsertCounts]:
    """Upsert the sample workflows, then their tasks; returns the counts of each."""
    admin_id = connection.execute(
        select(User.id).where(User.username == admin_username)
    ).scalar_one_or_none()
    workflows = [
        {
            "id": seed_id("workflow", item["name"]),
            "name": item["name"],
            "description": item["description"],
            "definition": item["definition"],
            "status": item["status"],
            "created_by": admin_id,
            "started_at": item.get("started_at"),
            "completed_at": item.get("completed_at"),
        }
        for item in SAMPLE_WORKFLOWS
    ]
    workflow_counts = upsert(
        connection, WORKFLOWS_TABLE, workflows, conflict=("id",), update=WORKFLOW_SEEDED
    )
    agents = agent_ids(connection, {task["agent"] for task in SAMPLE_TASKS})
    tasks = [
        {
            "id": seed_id("task", task["key"]),
            "workflow_id": seed_id("workflow", task["workflow"]) if task["workflow"] else None,
            "agent_id": agents.get(task["agent"]),
            "title": task["title"],
            "description": task.get("description", ""),
            "priority": task["priority"],
            "input": task["input"],
            **{name: task.get(name, 0 if name == "attempts" else None) for name in _TASK_RUNTIME},
            # a missing result is SQL NULL, not the JSON value null
            "result": task["result"] if "result" in task else null(),
        }
        for task in SAMPLE_TASKS
    ]
    task_counts = upsert(connection, TASKS_TABLE, tasks, conflict=("id",), update=TASK_SEEDED)
    return workflow_counts, task_counts
