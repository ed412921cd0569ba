"""The seed on a real database: exact counts, idempotent re-runs, all-or-nothing imports."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL, Engine

from db.seed.admin import AdminPasswordError, verify_password
from db.seed.agents import seed_agents
from db.seed.knowledge import SHIPPED_EXPORT, KnowledgeImportError, import_knowledge
from db.seed.run import seed
from db.seed.settings import SeedSettings
from tests.knowledge_lines import numbered_entry

MakeEngine = Callable[..., Engine]
SHIPPED_ENTRIES = sum(1 for line in SHIPPED_EXPORT.read_text().splitlines() if line.strip())


@pytest.fixture
def engine(migrated_db: URL, engine_for: MakeEngine) -> Engine:
    return engine_for(migrated_db)


def scalar(engine: Engine, sql: str, **params: object) -> object:
    with engine.connect() as connection:
        return connection.execute(text(sql), params).scalar()


def counts(engine: Engine) -> dict[str, object]:
    tables = ("agents", "users", "workflows", "tasks", "knowledge_base")
    return {table: scalar(engine, f"SELECT count(*) FROM {table}") for table in tables}


def test_first_seed_creates_everything_and_reports_it_exactly(
    engine: Engine, tmp_path: Path
) -> None:
    report = seed(engine, SeedSettings(admin_password_output=tmp_path / "pw"))
    assert report.agents.as_dict() == {"inserted": 10, "updated": 0, "unchanged": 0}
    assert report.admin.action == "inserted"
    assert report.workflows.inserted == 3 and report.tasks.inserted == 8
    assert report.knowledge.inserted == SHIPPED_ENTRIES
    assert counts(engine) == {
        "agents": 10,
        "users": 1,
        "workflows": 3,
        "tasks": 8,
        "knowledge_base": SHIPPED_ENTRIES,
    }
    assert scalar(engine, "SELECT count(*) FROM knowledge_base WHERE agent_id IS NOT NULL") > 40
    assert scalar(engine, "SELECT count(*) FROM tasks WHERE agent_id IS NULL") == 0


def test_second_seed_changes_nothing_and_fires_no_trigger(engine: Engine, tmp_path: Path) -> None:
    settings = SeedSettings(
        admin_password="a long admin password", admin_password_output=tmp_path / "pw"
    )
    seed(engine, settings)
    stamps = (
        "SELECT max(updated_at) FROM ("
        + " UNION ALL ".join(
            f"SELECT updated_at FROM {table}"
            for table in ("agents", "users", "workflows", "tasks", "knowledge_base")
        )
        + ") AS stamps"
    )
    before = scalar(engine, stamps)
    again = seed(engine, settings)
    assert again.changed == 0
    assert again.agents.unchanged == 10 and again.knowledge.unchanged == SHIPPED_ENTRIES
    assert again.admin.action == "unchanged"
    assert scalar(engine, stamps) == before


def test_reseed_restores_what_it_owns_and_keeps_runtime_state(
    engine: Engine, tmp_path: Path
) -> None:
    settings = SeedSettings(admin_password_output=tmp_path / "pw")
    seed(engine, settings)
    with engine.begin() as connection:
        connection.execute(text("UPDATE agents SET description = 'edited' WHERE name = 'coder'"))
        connection.execute(text("UPDATE agents SET status = 'busy' WHERE name = 'tester'"))
        connection.execute(
            text("UPDATE tasks SET status = 'cancelled' WHERE title LIKE 'Merge duplicate%'")
        )
    report = seed(engine, settings)
    assert report.agents.as_dict() == {"inserted": 0, "updated": 1, "unchanged": 9}
    assert report.tasks.changed == 0 and report.changed == 1
    assert scalar(engine, "SELECT description FROM agents WHERE name = 'coder'") != "edited"
    assert scalar(engine, "SELECT status FROM agents WHERE name = 'tester'") == "busy"
    assert scalar(engine, "SELECT count(*) FROM tasks WHERE status = 'cancelled'") == 1


def admin_hash(engine: Engine) -> str:
    return str(scalar(engine, "SELECT password_hash FROM users WHERE username = 'admin'"))


def test_given_admin_password_is_hashed_and_a_new_one_replaces_it(
    engine: Engine, tmp_path: Path
) -> None:
    first = SeedSettings(
        admin_password="first admin password", admin_password_output=tmp_path / "pw"
    )
    seed(engine, first)
    assert admin_hash(engine).startswith("$argon2id$")
    assert verify_password(admin_hash(engine), "first admin password")
    assert not (tmp_path / "pw").exists()

    second = SeedSettings(
        admin_password="second admin password", admin_password_output=tmp_path / "pw"
    )
    report = seed(engine, second)
    assert report.admin.action == "updated" and report.changed == 1
    assert verify_password(admin_hash(engine), "second admin password")
    assert not verify_password(admin_hash(engine), "first admin password")


def test_generated_admin_password_is_written_once_owner_only(
    engine: Engine, tmp_path: Path
) -> None:
    output = tmp_path / "state" / "admin-password"
    report = seed(engine, SeedSettings(admin_password_output=output))
    assert report.admin.password_file == output
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    password = output.read_text().strip()
    assert len(password) >= 24 and verify_password(admin_hash(engine), password)

    again = seed(engine, SeedSettings(admin_password_output=output))
    assert again.admin.action == "unchanged" and again.admin.password_file is None
    assert output.read_text().strip() == password
    assert verify_password(admin_hash(engine), password)


def test_existing_password_file_is_refused_and_nothing_is_written(
    engine: Engine, tmp_path: Path
) -> None:
    output = tmp_path / "admin-password"
    output.write_text("someone else's\n")
    with pytest.raises(AdminPasswordError, match="never overwritten"):
        seed(engine, SeedSettings(admin_password_output=output))
    assert output.read_text() == "someone else's\n"
    assert set(counts(engine).values()) == {0}


def write_export(path: Path, entries: list[dict[str, object]], extra: list[str] = ()) -> Path:
    lines = [json.dumps(entry) for entry in entries] + list(extra)
    path.write_text("\n".join(lines) + "\n")
    return path


def entry(number: int, **changes: object) -> dict[str, object]:
    return numbered_entry("t", number, **changes)


def test_malformed_export_writes_nothing_and_names_file_and_line(
    engine: Engine, tmp_path: Path
) -> None:
    with engine.begin() as connection:
        seed_agents(connection)
    path = write_export(tmp_path / "bad.jsonl", [entry(1), entry(2)], ['{"id": "t-3"', "[]"])
    with pytest.raises(KnowledgeImportError) as caught, engine.begin() as connection:
        import_knowledge(connection, path)
    assert caught.value.errors[0].startswith(f"{path}:3: invalid JSON")
    assert caught.value.errors[1].startswith(f"{path}:4: expected a JSON object")
    assert scalar(engine, "SELECT count(*) FROM knowledge_base") == 0


def test_unknown_agent_rejects_the_whole_export(engine: Engine, tmp_path: Path) -> None:
    seed(engine, SeedSettings(admin_password_output=tmp_path / "pw"))
    before = scalar(engine, "SELECT count(*) FROM knowledge_base")
    path = write_export(tmp_path / "kb.jsonl", [entry(1), entry(2, agent="nobody")])
    with pytest.raises(KnowledgeImportError) as caught, engine.begin() as connection:
        import_knowledge(connection, path)
    assert caught.value.errors == [f"{path}:2: unknown agent 'nobody'"]
    assert scalar(engine, "SELECT count(*) FROM knowledge_base") == before


def test_reimport_counts_inserted_updated_and_unchanged(engine: Engine, tmp_path: Path) -> None:
    seed(engine, SeedSettings(admin_password_output=tmp_path / "pw"))
    first = write_export(tmp_path / "v1.jsonl", [entry(1), entry(2), entry(3, agent=None)])
    with engine.begin() as connection:
        assert import_knowledge(connection, first).as_dict() == {
            "inserted": 3,
            "updated": 0,
            "unchanged": 0,
        }
    second = write_export(
        tmp_path / "v2.jsonl",
        [entry(1), entry(2, tags=["t", "new"]), entry(3, agent=None), entry(4)],
    )
    with engine.begin() as connection:
        assert import_knowledge(connection, second).as_dict() == {
            "inserted": 1,
            "updated": 1,
            "unchanged": 2,
        }
    assert scalar(engine, "SELECT tags FROM knowledge_base WHERE external_id = 't-2'") == [
        "t",
        "new",
    ]
    assert scalar(engine, "SELECT metadata FROM knowledge_base WHERE external_id = 't-4'") == {
        "n": 4
    }


def test_failed_seed_removes_the_password_file_it_wrote(engine: Engine, tmp_path: Path) -> None:
    output = tmp_path / "admin-password"
    bad = write_export(tmp_path / "bad.jsonl", [entry(1)], ["not json"])
    with pytest.raises(KnowledgeImportError):
        seed(engine, SeedSettings(admin_password_output=output), knowledge_file=bad)
    assert not output.exists()
    assert set(counts(engine).values()) == {0}
    report = seed(engine, SeedSettings(admin_password_output=output))
    assert report.admin.action == "inserted" and output.exists()


def test_import_in_batches_reports_progress_and_exact_totals(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("db.seed.knowledge.CHUNK_ROWS", 2)
    seed(engine, SeedSettings(admin_password_output=tmp_path / "pw"))
    path = write_export(tmp_path / "kb.jsonl", [entry(n) for n in range(5)])
    calls: list[tuple[int, int]] = []
    with engine.begin() as connection:
        counts = import_knowledge(connection, path, lambda done, total: calls.append((done, total)))
    assert calls == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert counts.as_dict() == {"inserted": 5, "updated": 0, "unchanged": 0}
