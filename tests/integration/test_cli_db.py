"""``ops db upgrade | downgrade | check | seed | import-knowledge``: exit codes and output."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from db.seed.knowledge import SHIPPED_EXPORT
from ops.cli import main
from tests.pgcluster import free_port

KNOWLEDGE = sum(1 for line in SHIPPED_EXPORT.read_text().splitlines() if line.strip())
PointAt = Callable[[URL], None]
OWN_PREFIXES = ("DATABASE_", "POSTGRES_", "DB_", "ADMIN_", "APP_DB_", "MONITOR_DB_", "BACKUP_DB_")


@pytest.fixture
def use_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> PointAt:
    """Point the in-process CLI at a database URL, nothing else of the caller's environment."""
    for name in list(os.environ):
        if name.startswith(OWN_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ADMIN_PASSWORD_OUTPUT", str(tmp_path / "admin-password"))

    def point(url: URL) -> None:
        monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))

    return point


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def count(url: URL, table: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


def test_upgrade_check_downgrade_cycle(
    empty_db: URL, use_database: PointAt, capsys: pytest.CaptureFixture[str]
) -> None:
    use_database(empty_db)
    code, out, _ = run(capsys, "db", "check", "--json")
    assert code == 1
    assert json.loads(out) == {
        "ok": False,
        "current": None,
        "head": "0001",
        "problems": ["schema at no revision, head is 0001"],
    }
    assert run(capsys, "db", "upgrade")[:2] == (0, "schema: empty -> 0001\n")
    code, out, _ = run(capsys, "db", "check")
    assert (code, out) == (0, "schema at head (0001) and matches the models\n")
    assert run(capsys, "db", "upgrade")[:2] == (0, "schema: 0001 -> 0001\n")
    assert run(capsys, "db", "downgrade", "base")[:2] == (0, "schema: 0001 -> empty\n")
    assert run(capsys, "db", "check")[0] == 1


def test_check_fails_when_the_database_drifted(
    migrated_db: URL, use_database: PointAt, capsys: pytest.CaptureFixture[str]
) -> None:
    use_database(migrated_db)
    engine = create_engine(migrated_db)
    try:
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE users DROP COLUMN last_login_at"))
    finally:
        engine.dispose()
    code, out, _ = run(capsys, "db", "check", "--json")
    assert code == 1
    assert any("last_login_at" in p for p in json.loads(out)["problems"])


def test_bad_revisions_are_usage_errors(
    migrated_db: URL, use_database: PointAt, capsys: pytest.CaptureFixture[str]
) -> None:
    use_database(migrated_db)
    code, _, err = run(capsys, "db", "upgrade", "nosuchrev")
    assert code == 2 and "nosuchrev" in err
    with pytest.raises(SystemExit) as exited:
        main(["db", "downgrade"])
    assert exited.value.code == 2


def test_seed_refuses_a_schema_not_at_head(
    empty_db: URL, use_database: PointAt, capsys: pytest.CaptureFixture[str]
) -> None:
    use_database(empty_db)
    code, _, err = run(capsys, "db", "seed")
    assert code == 1 and "not at head" in err


def test_seed_reports_counts_then_nothing(
    migrated_db: URL, use_database: PointAt, capsys: pytest.CaptureFixture[str]
) -> None:
    use_database(migrated_db)
    code, out, _ = run(capsys, "db", "seed")
    assert code == 0
    assert "agents: 10 inserted, 0 updated, 0 unchanged" in out
    assert f"knowledge: {KNOWLEDGE} inserted" in out
    code, out, _ = run(capsys, "db", "seed", "--json")
    assert code == 0 and json.loads(out)["changed"] == 0


def test_import_knowledge_rejects_a_malformed_file_and_writes_nothing(
    migrated_db: URL, use_database: PointAt, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    use_database(migrated_db)
    lines = SHIPPED_EXPORT.read_text().splitlines()[:5]
    lines[3] = lines[3].replace('"category"', '"kategory"')
    bad = tmp_path / "export.jsonl"
    bad.write_text("\n".join([*lines, "{truncated"]) + "\n")
    code, out, err = run(capsys, "db", "import-knowledge", str(bad))
    assert code == 1 and out == ""
    assert f"{bad}:4: missing field 'category'" in err
    assert f"{bad}:4: unknown field 'kategory'" in err
    assert f"{bad}:6: invalid JSON" in err
    assert "nothing was written" in err
    assert count(migrated_db, "knowledge_base") == 0


def test_import_knowledge_upserts_a_good_file(
    migrated_db: URL, use_database: PointAt, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    use_database(migrated_db)
    assert run(capsys, "db", "seed")[0] == 0
    newer = tmp_path / "newer.jsonl"
    entries = [json.loads(line) for line in SHIPPED_EXPORT.read_text().splitlines()[:3]]
    entries[0]["content"] += " Confirmed again in a later incident."
    entries.append({**entries[1], "id": "kb-new-1", "title": "A new entry"})
    newer.write_text("".join(json.dumps(e) + "\n" for e in entries))
    code, out, _ = run(capsys, "db", "import-knowledge", str(newer), "--json")
    assert code == 0
    assert json.loads(out) == {"file": str(newer), "inserted": 1, "updated": 1, "unchanged": 2}
    assert count(migrated_db, "knowledge_base") == KNOWLEDGE + 1


def test_import_knowledge_of_a_missing_file_fails_cleanly(
    migrated_db: URL, use_database: PointAt, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    use_database(migrated_db)
    code, _, err = run(capsys, "db", "import-knowledge", str(tmp_path / "nope.jsonl"))
    assert code == 1 and f"{tmp_path / 'nope.jsonl'}:0: cannot read" in err


def test_commands_against_an_unreachable_server_fail_with_exit_1(
    use_database: PointAt, capsys: pytest.CaptureFixture[str]
) -> None:
    use_database(URL.create("postgresql", "u", "cli-secret-pw", "127.0.0.1", free_port(), "d"))
    for args in (["db", "check"], ["db", "upgrade"], ["db", "seed"]):
        code, _, err = run(capsys, *args)
        assert code == 1, args
        assert "database error on postgresql+psycopg2://u:***@127.0.0.1" in err
        assert "cli-secret-pw" not in err
