"""A demo workload shaped like the platform's: agents claiming tasks, writing results and knowledge.

It exists to put real traffic through the ``db`` pool so dashboards and alerts have something to
show. Each agent thread holds one pooled connection for a whole task, the way a worker that
keeps its transaction open while a model call runs does: claim the next task with
``FOR UPDATE SKIP LOCKED`` (so agents never take the same task), "work" for the hold time,
write the result, sometimes a knowledge entry, and a duration metric, then commit. With more
agents than pooled connections (``WORKLOAD_MODE=saturate``) the pool runs full and callers
wait: the situation ``DbopsPoolSaturated`` is about.

Growth is bounded: the workload only touches tasks it created (``input.origin = workload``),
keeps a fixed number of finished ones, upserts knowledge on a fixed set of external ids and
prunes its old metric rows.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from db.errors import error_line
from db.models import Agent, KnowledgeEntry, Metric, Task
from db.settings import DbSettings, EnvReader
from ops.settings import read_listen

log = logging.getLogger(__name__)

ORIGIN = "workload"
MODES = ("steady", "saturate")
# Knowledge entries are upserted on this many external ids per agent, so the table stays small.
KNOWLEDGE_TOPICS = 12
FAILURE_RATE = 0.05
KNOWLEDGE_RATE = 0.2
PRUNE_EVERY = 30.0

WORK = {
    "planner": ("Break down release {n} into tasks", "Re-plan sprint after incident {n}"),
    "researcher": ("Survey vector stores for corpus {n}", "Summarise paper batch {n}"),
    "coder": ("Implement endpoint /v1/items/{n}", "Fix flaky retry in client {n}"),
    "reviewer": ("Review pull request #{n}", "Check migration {n} for locking"),
    "tester": ("Write regression test for bug {n}", "Run load test profile {n}"),
}
GENERIC_WORK = ("Process request {n}", "Answer support question {n}", "Triage report {n}")


class WorkloadError(Exception):
    """The workload cannot run (for example: no agents to work as)."""


@dataclass(frozen=True)
class WorkloadSettings:
    mode: str = "steady"
    concurrency: int = 4
    hold_seconds: float = 0.05
    think_seconds: float = 0.5
    duration: float = 0.0  # 0: until stopped
    listen_host: str = "0.0.0.0"
    listen_port: int = 9189
    queue_depth: int = 50
    keep_finished: int = 2000
    metrics_retention: float = 3600.0


def read_workload_settings(reader: EnvReader, db: DbSettings) -> WorkloadSettings:
    """Mode presets first, explicit variables over them; saturate sizes itself from the pool."""
    mode = reader.choice("WORKLOAD_MODE", "steady", MODES)
    capacity = db.pool_size + db.max_overflow
    if mode == "saturate":
        # Two agents per connection, each holding it for a second: there are always callers
        # waiting, yet each wait stays near one hold time, far below DB_POOL_TIMEOUT. (Timeouts
        # would be DbopsPoolTimeouts, which pages instead.) The short pause after each task
        # keeps an agent from grabbing back the connection it just returned ahead of waiters.
        defaults = (2 * capacity, 1.0, 0.1)
    else:
        defaults = (max(1, min(4, capacity)), 0.05, 0.5)
    host, port = read_listen(reader, "WORKLOAD_LISTEN", "0.0.0.0:9189")
    return WorkloadSettings(
        mode=mode,
        concurrency=reader.integer("WORKLOAD_CONCURRENCY", defaults[0], minimum=1, maximum=500),
        hold_seconds=reader.duration("WORKLOAD_HOLD_SECONDS", defaults[1]),
        think_seconds=reader.duration("WORKLOAD_THINK_SECONDS", defaults[2]),
        duration=reader.duration("WORKLOAD_DURATION", 0.0),
        listen_host=host,
        listen_port=port,
        queue_depth=reader.integer("WORKLOAD_QUEUE_DEPTH", 50, minimum=1, maximum=100_000),
        keep_finished=reader.integer("WORKLOAD_KEEP_FINISHED", 2000, minimum=0),
    )


def load_workload_settings(
    environ: Mapping[str, str] | None = None,
) -> tuple[DbSettings, WorkloadSettings]:
    from db.settings import read_db_settings

    reader = EnvReader(environ)
    db = read_db_settings(reader)
    settings = read_workload_settings(reader, db)
    reader.finish()
    return db, settings


@dataclass
class WorkloadStats:
    """What the run did; ``saturated_samples`` counts pool samples with every connection out."""

    completed: int = 0
    failed: int = 0
    knowledge_upserts: int = 0
    tasks_created: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    pool_samples: int = 0
    saturated_samples: int = 0
    peak_checked_out: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, amount: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + amount)

    def error(self, kind: str) -> bool:
        """Count an error; True the first time this kind is seen (log it once, not per task)."""
        with self.lock:
            self.errors[kind] += 1
            return self.errors[kind] == 1

    def summary(self) -> str:
        errors = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"completed={self.completed} failed={self.failed} "
            f"knowledge_upserts={self.knowledge_upserts} tasks_created={self.tasks_created} "
            f"pool_peak={self.peak_checked_out} saturated_samples={self.saturated_samples}/"
            f"{self.pool_samples} errors: {errors}"
        )


@dataclass(frozen=True)
class AgentRef:
    id: uuid.UUID
    name: str
    role: str


class Workload:
    """Agent threads plus a producer that keeps the queue fed; stops when ``stop`` is set."""

    def __init__(
        self, engine: Engine, settings: WorkloadSettings, stop: threading.Event | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.stop = stop or threading.Event()
        self.stats = WorkloadStats()
        self._counter = int(time.time())
        self._counter_lock = threading.Lock()

    def agents(self) -> list[AgentRef]:
        with Session(self.engine) as session:
            rows = session.execute(
                select(Agent.id, Agent.name, Agent.role)
                .where(Agent.status != "disabled")
                .order_by(Agent.name)
            ).all()
        if not rows:
            raise WorkloadError("no agents in the database: run `ops db init` (it seeds them)")
        return [AgentRef(row.id, row.name, row.role) for row in rows]

    def run(self) -> WorkloadStats:
        agents = self.agents()
        self.produce_once(agents)
        threads = [threading.Thread(target=self._produce, args=(agents,), name="producer")]
        threads += [
            threading.Thread(target=self._agent, args=(agents[i % len(agents)],), name=f"agent-{i}")
            for i in range(self.settings.concurrency)
        ]
        log.info(
            "workload started: mode=%s agents=%d (as %d agent identities) hold=%gs think=%gs",
            self.settings.mode,
            self.settings.concurrency,
            len(agents),
            self.settings.hold_seconds,
            self.settings.think_seconds,
        )
        for thread in threads:
            thread.start()
        started = time.monotonic()
        next_report = started + 30
        try:
            while not self.stop.is_set():
                if self.settings.duration and time.monotonic() - started >= self.settings.duration:
                    break
                self._sample_pool()
                if time.monotonic() >= next_report:
                    log.info("workload: %s", self.stats.summary())
                    next_report += 30
                self.stop.wait(0.25)
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=self.settings.hold_seconds + 35)
        log.info(
            "workload stopped after %.0fs: %s", time.monotonic() - started, self.stats.summary()
        )
        return self.stats

    # --- the agents ------------------------------------------------------------------------

    def _agent(self, agent: AgentRef) -> None:
        rng = random.Random()
        while not self.stop.is_set():
            try:
                worked = self.work_one(agent, rng)
            except Exception as error:  # one failed task must not end the agent
                kind = type(error).__name__
                if self.stats.error(kind):
                    log.warning("agent %s: %s: %s", agent.name, kind, error_line(error))
                self.stop.wait(1.0)
                continue
            pause = self.settings.think_seconds if worked else max(0.2, self.settings.think_seconds)
            if pause:
                self.stop.wait(pause * rng.uniform(0.5, 1.5))

    def work_one(self, agent: AgentRef, rng: random.Random) -> bool:
        """Claim, work on and finish one task in one transaction; False when the queue is empty."""
        with Session(self.engine) as session, session.begin():
            task = session.execute(
                select(Task.id, Task.title, Task.input)
                .where(Task.status == "pending", Task.input["origin"].astext == ORIGIN)
                .order_by(Task.priority.desc(), Task.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).one_or_none()
            if task is None:
                return False
            started = time.monotonic()
            session.execute(
                update(Task)
                .where(Task.id == task.id)
                .values(
                    status="running",
                    agent_id=agent.id,
                    attempts=Task.attempts + 1,
                    started_at=func.clock_timestamp(),
                )
            )
            # The model call / tool run the agent waits on, with its connection still held.
            self.stop.wait(self.settings.hold_seconds * rng.uniform(0.8, 1.2))
            elapsed = time.monotonic() - started
            failed = rng.random() < FAILURE_RATE
            values: dict[str, Any] = {"status": "failed" if failed else "completed"}
            values["completed_at"] = func.clock_timestamp()
            if failed:
                values["error"] = "tool call timed out after 3 retries"
            else:
                values["result"] = {
                    "summary": f"{task.title}: done by {agent.name}",
                    "tokens": rng.randint(200, 4000),
                    "seconds": round(elapsed, 3),
                }
            session.execute(update(Task).where(Task.id == task.id).values(**values))
            if not failed and rng.random() < KNOWLEDGE_RATE:
                self._learn(session, agent, rng)
            session.execute(
                insert(Metric).values(
                    name="agent_task_duration_seconds",
                    value=elapsed,
                    labels={"agent": agent.name, "origin": ORIGIN, "outcome": values["status"]},
                    agent_id=agent.id,
                )
            )
        self.stats.add("failed" if failed else "completed")
        return True

    def _learn(self, session: Session, agent: AgentRef, rng: random.Random) -> None:
        topic = rng.randrange(KNOWLEDGE_TOPICS)
        statement = pg_insert(KnowledgeEntry).values(
            external_id=f"{ORIGIN}:{agent.name}:{topic}",
            agent_id=agent.id,
            category="observation",
            title=f"{agent.role}: observation {topic}",
            content=f"Seen while working as {agent.name}: pattern {topic} recurs "
            f"(latest sample {rng.randint(1, 10_000)}).",
            source=f"{ORIGIN}/{agent.name}",
            tags=[ORIGIN, agent.role],
            meta={"confidence": round(rng.uniform(0.5, 1.0), 2), "origin": ORIGIN},
        )
        session.execute(
            statement.on_conflict_do_update(
                index_elements=[KnowledgeEntry.external_id],
                set_={
                    "content": statement.excluded.content,
                    "metadata": statement.excluded.metadata,
                },
            )
        )
        self.stats.add("knowledge_upserts")

    # --- the queue ---------------------------------------------------------------------------

    def _produce(self, agents: list[AgentRef]) -> None:
        last_prune = time.monotonic()
        while not self.stop.wait(1.0):
            try:
                self.produce_once(agents)
                if time.monotonic() - last_prune >= PRUNE_EVERY:
                    self.prune()
                    last_prune = time.monotonic()
            except Exception as error:
                kind = f"producer:{type(error).__name__}"
                if self.stats.error(kind):
                    log.warning("producer: %s: %s", type(error).__name__, error_line(error))

    def produce_once(self, agents: list[AgentRef]) -> int:
        """Top the queue of pending workload tasks up to ``queue_depth``."""
        with Session(self.engine) as session, session.begin():
            pending = session.execute(
                select(func.count())
                .select_from(Task)
                .where(Task.status == "pending", Task.input["origin"].astext == ORIGIN)
            ).scalar_one()
            missing = self.settings.queue_depth - int(pending)
            if missing <= 0:
                return 0
            rows = [self._new_task(agents) for _ in range(missing)]
            session.execute(insert(Task), rows)
        self.stats.add("tasks_created", len(rows))
        return len(rows)

    def _new_task(self, agents: list[AgentRef]) -> dict[str, Any]:
        with self._counter_lock:
            self._counter += 1
            number = self._counter
        role = random.choice(agents).role.lower()
        templates = next((v for k, v in WORK.items() if k in role), GENERIC_WORK)
        return {
            "title": random.choice(templates).format(n=number),
            "priority": random.choice((0, 0, 0, 1, 1, 5)),
            "input": {"origin": ORIGIN, "request": number},
        }

    def prune(self) -> int:
        """Delete finished workload tasks beyond the newest ``keep_finished`` and old metrics."""
        with Session(self.engine) as session, session.begin():
            keep = (
                select(Task.id)
                .where(
                    Task.input["origin"].astext == ORIGIN,
                    Task.status.in_(("completed", "failed")),
                )
                .order_by(Task.completed_at.desc())
                .offset(self.settings.keep_finished)
            )
            no_sync = {"synchronize_session": False}
            tasks: Any = session.execute(
                delete(Task).where(Task.id.in_(keep)), execution_options=no_sync
            )
            retention = timedelta(seconds=self.settings.metrics_retention)
            metrics: Any = session.execute(
                delete(Metric).where(
                    Metric.labels["origin"].astext == ORIGIN,
                    Metric.recorded_at < func.now() - retention,
                ),
                execution_options=no_sync,
            )
        return int(tasks.rowcount or 0) + int(metrics.rowcount or 0)

    def _sample_pool(self) -> None:
        pool: Any = self.engine.pool
        if not hasattr(pool, "checkedout"):
            return
        checked_out = int(pool.checkedout())
        capacity = int(pool.size()) + max(0, int(getattr(pool, "_max_overflow", 0)))
        with self.stats.lock:
            self.stats.pool_samples += 1
            self.stats.peak_checked_out = max(self.stats.peak_checked_out, checked_out)
            if checked_out >= capacity:
                self.stats.saturated_samples += 1
