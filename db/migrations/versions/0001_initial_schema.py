"""Initial schema: the seven tables, their indexes, updated_at triggers and reporting views.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

The downgrade drops everything this revision made except the extensions: other schemas in the
same database may use pgcrypto, and dropping an extension is not this project's call.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


TABLES_WITH_UPDATED_AT = ("agents", "users", "knowledge_base", "sessions", "workflows", "tasks")

SET_UPDATED_AT = """
CREATE FUNCTION set_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- an UPDATE that sets updated_at itself keeps the value it chose
    IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := clock_timestamp();
    END IF;
    RETURN NEW;
END
$$
"""

AGENT_WORKLOAD = """
CREATE VIEW agent_workload AS
SELECT a.id AS agent_id,
       a.name,
       a.role,
       a.status,
       a.max_concurrent_tasks,
       count(t.id) FILTER (WHERE t.status IN ('pending', 'queued')) AS queued_tasks,
       count(t.id) FILTER (WHERE t.status = 'running') AS running_tasks,
       count(t.id) FILTER (WHERE t.status = 'completed') AS completed_tasks,
       count(t.id) FILTER (WHERE t.status = 'failed') AS failed_tasks,
       round(count(t.id) FILTER (WHERE t.status = 'running')::numeric
             / a.max_concurrent_tasks, 3) AS utilisation,
       max(t.completed_at) AS last_completed_at
FROM agents a
LEFT JOIN tasks t ON t.agent_id = a.id
GROUP BY a.id
"""

TASK_STATUS_SUMMARY = """
CREATE VIEW task_status_summary AS
SELECT status,
       count(*) AS tasks,
       min(created_at) AS oldest_created_at,
       avg(extract(epoch FROM completed_at - started_at))
           FILTER (WHERE completed_at IS NOT NULL AND started_at IS NOT NULL)
           AS avg_duration_seconds
FROM tasks
GROUP BY status
"""

ACTIVE_SESSIONS = """
CREATE VIEW active_sessions AS
SELECT s.id AS session_id,
       s.user_id,
       u.username,
       u.role,
       s.created_at,
       s.expires_at,
       s.client_ip
FROM sessions s
JOIN users u ON u.id = s.user_id
WHERE s.revoked_at IS NULL AND s.expires_at > now() AND u.is_active
"""

VIEWS = ("agent_workload", "task_status_summary", "active_sessions")


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    op.create_table(
        "agents",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=100), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "capabilities",
            sa.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
        ),
        sa.Column(
            "config",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("status", sa.String(length=16), server_default="idle", nullable=False),
        sa.Column(
            "max_concurrent_tasks", sa.Integer(), server_default=sa.text("1"), nullable=False
        ),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('active', 'idle', 'busy', 'disabled')", name=op.f("ck_agents_status")
        ),
        sa.CheckConstraint(
            "max_concurrent_tasks > 0", name=op.f("ck_agents_max_concurrent_tasks_positive")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
        sa.UniqueConstraint("name", name=op.f("uq_agents_name")),
    )
    op.create_index(op.f("ix_agents_status"), "agents", ["status"], unique=False)
    op.create_table(
        "users",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("display_name", sa.String(length=200), nullable=True),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("role", sa.String(length=32), server_default="viewer", nullable=False),
        sa.Column("is_active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "role IN ('admin', 'operator', 'developer', 'viewer')", name=op.f("ck_users_role")
        ),
        sa.CheckConstraint("length(password_hash) > 0", name=op.f("ck_users_password_hash_set")),
        sa.CheckConstraint("username = lower(username)", name=op.f("ck_users_username_lowercase")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("email", name=op.f("uq_users_email")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    op.create_table(
        "knowledge_base",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=True),
        sa.Column("agent_id", sa.UUID(), nullable=True),
        sa.Column("category", sa.String(length=100), nullable=False),
        sa.Column("title", sa.String(length=300), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=500), nullable=False),
        sa.Column(
            "tags", sa.ARRAY(sa.Text()), server_default=sa.text("'{}'::text[]"), nullable=False
        ),
        sa.Column(
            "metadata",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "jsonb_typeof(metadata) = 'object'", name=op.f("ck_knowledge_base_metadata_object")
        ),
        sa.CheckConstraint("length(content) > 0", name=op.f("ck_knowledge_base_content_not_empty")),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_knowledge_base_agent_id_agents"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_knowledge_base")),
        sa.UniqueConstraint("external_id", name=op.f("uq_knowledge_base_external_id")),
    )
    op.create_index(
        op.f("ix_knowledge_base_agent_id_category"),
        "knowledge_base",
        ["agent_id", "category"],
        unique=False,
    )
    op.create_index(
        op.f("ix_knowledge_base_category"), "knowledge_base", ["category"], unique=False
    )
    op.create_index(
        op.f("ix_knowledge_base_tags"),
        "knowledge_base",
        ["tags"],
        unique=False,
        postgresql_using="gin",
    )
    op.create_table(
        "metrics",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column(
            "labels",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("agent_id", sa.UUID(), nullable=True),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "jsonb_typeof(labels) = 'object'", name=op.f("ck_metrics_labels_object")
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_metrics_agent_id_agents"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metrics")),
    )
    op.create_index(
        op.f("ix_metrics_agent_id_recorded_at"),
        "metrics",
        ["agent_id", "recorded_at"],
        unique=False,
    )
    op.create_index(
        "ix_metrics_name_recorded_at",
        "metrics",
        ["name", sa.literal_column("recorded_at DESC")],
        unique=False,
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("client_ip", postgresql.INET(), nullable=True),
        sa.Column("user_agent", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "token_hash ~ '^[0-9a-f]{64}$'", name=op.f("ck_sessions_token_hash_sha256_hex")
        ),
        sa.CheckConstraint(
            "expires_at > created_at", name=op.f("ck_sessions_expires_after_created")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_sessions_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_sessions_token_hash")),
    )
    op.create_index(op.f("ix_sessions_expires_at"), "sessions", ["expires_at"], unique=False)
    op.create_index(
        op.f("ix_sessions_user_id_expires_at"), "sessions", ["user_id", "expires_at"], unique=False
    )
    op.create_table(
        "workflows",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "definition",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("status", sa.String(length=16), server_default="draft", nullable=False),
        sa.Column("created_by", sa.UUID(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "jsonb_typeof(definition) = 'object'", name=op.f("ck_workflows_definition_object")
        ),
        sa.CheckConstraint(
            "status IN ('draft', 'active', 'running', 'paused', 'completed', 'failed', 'cancelled')",
            name=op.f("ck_workflows_status"),
        ),
        sa.ForeignKeyConstraint(
            ["created_by"],
            ["users.id"],
            name=op.f("fk_workflows_created_by_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflows")),
        sa.UniqueConstraint("name", name=op.f("uq_workflows_name")),
    )
    op.create_index(op.f("ix_workflows_created_by"), "workflows", ["created_by"], unique=False)
    op.create_index(
        op.f("ix_workflows_status_updated_at"), "workflows", ["status", "updated_at"], unique=False
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("workflow_id", sa.UUID(), nullable=True),
        sa.Column("agent_id", sa.UUID(), nullable=True),
        sa.Column("title", sa.String(length=300), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "input",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("result", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'queued', 'running', 'completed', 'failed', 'cancelled')",
            name=op.f("ck_tasks_status"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_tasks_attempts_non_negative")),
        sa.CheckConstraint(
            "completed_at IS NULL OR started_at IS NULL OR completed_at >= started_at",
            name=op.f("ck_tasks_completed_after_started"),
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_tasks_agent_id_agents"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["workflows.id"],
            name=op.f("fk_tasks_workflow_id_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
    )
    op.create_index(op.f("ix_tasks_agent_id_status"), "tasks", ["agent_id", "status"], unique=False)
    op.create_index(
        "ix_tasks_queue",
        "tasks",
        ["status", sa.literal_column("priority DESC"), "created_at"],
        unique=False,
    )
    op.create_index(op.f("ix_tasks_workflow_id"), "tasks", ["workflow_id"], unique=False)

    op.execute(SET_UPDATED_AT)
    for table in TABLES_WITH_UPDATED_AT:
        op.execute(
            f"CREATE TRIGGER {table}_set_updated_at BEFORE UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION set_updated_at()"
        )
    op.execute(AGENT_WORKLOAD)
    op.execute(TASK_STATUS_SUMMARY)
    op.execute(ACTIVE_SESSIONS)


def downgrade() -> None:
    for view in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    for table in TABLES_WITH_UPDATED_AT:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_set_updated_at ON {table}")
    op.execute("DROP FUNCTION IF EXISTS set_updated_at()")
    op.drop_index(op.f("ix_tasks_workflow_id"), table_name="tasks")
    op.drop_index("ix_tasks_queue", table_name="tasks")
    op.drop_index(op.f("ix_tasks_agent_id_status"), table_name="tasks")
    op.drop_table("tasks")
    op.drop_index(op.f("ix_workflows_status_updated_at"), table_name="workflows")
    op.drop_index(op.f("ix_workflows_created_by"), table_name="workflows")
    op.drop_table("workflows")
    op.drop_index(op.f("ix_sessions_user_id_expires_at"), table_name="sessions")
    op.drop_index(op.f("ix_sessions_expires_at"), table_name="sessions")
    op.drop_table("sessions")
    op.drop_index("ix_metrics_name_recorded_at", table_name="metrics")
    op.drop_index(op.f("ix_metrics_agent_id_recorded_at"), table_name="metrics")
    op.drop_table("metrics")
    op.drop_index(
        op.f("ix_knowledge_base_tags"), table_name="knowledge_base", postgresql_using="gin"
    )
    op.drop_index(op.f("ix_knowledge_base_category"), table_name="knowledge_base")
    op.drop_index(op.f("ix_knowledge_base_agent_id_category"), table_name="knowledge_base")
    op.drop_table("knowledge_base")
    op.drop_table("users")
    op.drop_index(op.f("ix_agents_status"), table_name="agents")
    op.drop_table("agents")
