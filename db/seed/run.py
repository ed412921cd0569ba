"""The seed as one unit of work: agents, admin, sample workflows and tasks, the knowledge base.

Everything happens in one transaction, so a failure anywhere (a malformed export, a password
file that already exists) leaves the database as it was. The only side effect outside the
database, the generated admin password file, is removed again when the transaction does not
commit, so the next attempt can write it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from db.seed.admin import AdminResult, seed_admin
from db.seed.agents import seed_agents
from db.seed.knowledge import SHIPPED_EXPORT, import_knowledge
from db.seed.samples import seed_samples
from db.seed.settings import SeedSettings
from db.seed.upsert import UpsertCounts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedReport:
    agents: UpsertCounts
    admin: AdminResult
    workflows: UpsertCounts
    tasks: UpsertCounts
    knowledge: UpsertCounts

    @property
    def changed(self) -> int:
        return (
            self.agents.changed
            + self.admin.changed
            + self.workflows.changed
            + self.tasks.changed
            + self.knowledge.changed
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "agents": self.agents.as_dict(),
            "admin": {
                "action": self.admin.action,
                "password_file": str(self.admin.password_file)
                if self.admin.password_file
                else None,
            },
            "workflows": self.workflows.as_dict(),
            "tasks": self.tasks.as_dict(),
            "knowledge": self.knowledge.as_dict(),
            "changed": self.changed,
        }

    def lines(self) -> list[str]:
        admin = self.admin.action
        if self.admin.password_file is not None:
            admin += f" (generated password written to {self.admin.password_file})"
        return [
            f"agents: {self.agents}",
            f"admin: {admin}",
            f"workflows: {self.workflows}",
            f"tasks: {self.tasks}",
            f"knowledge: {self.knowledge}",
        ]


def seed(
    engine: Engine, settings: SeedSettings, knowledge_file: Path = SHIPPED_EXPORT
) -> SeedReport:
    """Upsert the seed data in one transaction; re-running it changes nothing."""
    admin: AdminResult | None = None
    try:
        with engine.begin() as connection:
            agents = seed_agents(connection)
            admin = seed_admin(connection, settings)
            workflows, tasks = seed_samples(connection, settings.admin_username)
            knowledge = import_knowledge(connection, knowledge_file)
    except BaseException:
        if admin is not None and admin.password_file is not None:
            # The admin this password belongs to was never committed.
            admin.password_file.unlink(missing_ok=True)
            log.warning("seed rolled back; removed %s", admin.password_file)
        raise
    report = SeedReport(agents, admin, workflows, tasks, knowledge)
    log.info("seed: %s", "; ".join(report.lines()))
    return report
