"""The ten agents every fresh platform starts with.

The seed owns their description, capabilities, configuration and concurrency; ``status`` and
heartbeats belong to the running platform and are only set when an agent is first created.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.engine import Connection

from db.models import Agent
from db.seed.upsert import UpsertCounts, upsert

AGENTS_TABLE: Table = Agent.__table__  # type: ignore[assignment]
SEEDED_COLUMNS = ("role", "description", "capabilities", "config", "max_concurrent_tasks")


def _agent(
    name: str,
    role: str,
    description: str,
    capabilities: list[str],
    max_concurrent_tasks: int,
    **config: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "description": description,
        "capabilities": capabilities,
        "config": config,
        "max_concurrent_tasks": max_concurrent_tasks,
    }


DEFAULT_AGENTS: tuple[dict[str, Any], ...] = (
    _agent(
        "planner",
        "orchestration",
        "Breaks a request into a workflow of tasks, assigns each to the agent best suited to it "
        "and re-plans when a step fails.",
        ["task-decomposition", "workflow-design", "agent-routing", "replanning"],
        4,
        model="large",
        temperature=0.2,
        timeout_seconds=120,
        max_workflow_steps=25,
    ),
    _agent(
        "researcher",
        "research",
        "Gathers and cross-checks information from documentation, the knowledge base and "
        "approved web sources, and cites where each fact came from.",
        ["web-search", "document-reading", "summarisation", "citation"],
        6,
        model="large",
        temperature=0.3,
        timeout_seconds=300,
        allowed_domains=["docs.python.org", "www.postgresql.org", "docs.sqlalchemy.org"],
    ),
    _agent(
        "coder",
        "engineering",
        "Writes and changes code in the platform's repositories behind a branch and a pull "
        "request, never on the default branch.",
        ["python", "sql", "typescript", "refactoring", "git"],
        3,
        model="large",
        temperature=0.1,
        timeout_seconds=900,
        sandbox="container",
    ),
    _agent(
        "reviewer",
        "engineering",
        "Reviews pull requests for correctness, tests and style, and blocks merges that lower "
        "coverage or skip migrations.",
        ["code-review", "diff-analysis", "style-checking"],
        4,
        model="large",
        temperature=0.0,
        timeout_seconds=300,
        required_checks=["lint", "unit", "integration"],
    ),
    _agent(
        "tester",
        "quality",
        "Writes and runs unit, integration and regression tests; reproduces reported bugs "
        "before anyone fixes them.",
        ["pytest", "test-generation", "bug-reproduction", "coverage-analysis"],
        4,
        model="medium",
        temperature=0.1,
        timeout_seconds=1200,
        flaky_retry_limit=2,
    ),
    _agent(
        "data-analyst",
        "analytics",
        "Answers questions with SQL against read replicas and reporting views, and explains "
        "the numbers with their caveats.",
        ["sql", "statistics", "charting", "data-quality"],
        3,
        model="medium",
        temperature=0.2,
        timeout_seconds=600,
        statement_timeout_ms=30000,
    ),
    _agent(
        "ops-sre",
        "operations",
        "Watches alerts, runs runbooks, checks backups and capacity, and opens incidents with "
        "a timeline when something is wrong.",
        ["incident-response", "runbooks", "prometheus", "postgresql", "backups"],
        2,
        model="medium",
        temperature=0.0,
        timeout_seconds=600,
        escalation_channel="#platform-oncall",
    ),
    _agent(
        "security-auditor",
        "security",
        "Audits dependencies, configuration and access grants, and files findings with a "
        "severity and a concrete fix.",
        ["dependency-audit", "secret-scanning", "access-review", "threat-modelling"],
        2,
        model="large",
        temperature=0.0,
        timeout_seconds=900,
        severity_threshold="medium",
    ),
    _agent(
        "doc-writer",
        "documentation",
        "Keeps READMEs, runbooks and API references in step with the code, and writes release "
        "notes from merged changes.",
        ["technical-writing", "markdown", "api-reference", "release-notes"],
        3,
        model="medium",
        temperature=0.4,
        timeout_seconds=300,
        style_guide="docs/style.md",
    ),
    _agent(
        "knowledge-curator",
        "knowledge",
        "Turns what the other agents learn into knowledge-base entries, merges duplicates and "
        "retires entries that went stale.",
        ["deduplication", "tagging", "summarisation", "knowledge-review"],
        2,
        model="medium",
        temperature=0.2,
        timeout_seconds=300,
        stale_after_days=180,
    ),
)

DEFAULT_AGENT_NAMES = frozenset(agent["name"] for agent in DEFAULT_AGENTS)


def seed_agents(connection: Connection) -> UpsertCounts:
    return upsert(
        connection, AGENTS_TABLE, DEFAULT_AGENTS, conflict=("name",), update=SEEDED_COLUMNS
    )


def agent_ids(connection: Connection, names: set[str] | frozenset[str]) -> dict[str, Any]:
    """The ids of the named agents that exist (seeded or created by the platform)."""
    if not names:
        return {}
    rows = connection.execute(select(Agent.name, Agent.id).where(Agent.name.in_(sorted(names))))
    return {name: agent_id for name, agent_id in rows}
