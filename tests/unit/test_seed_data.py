"""The shipped seed data and the knowledge export's validation, without a database."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from db.seed.admin import AdminPasswordError, hash_password, verify_password, write_password_file
from db.seed.agents import DEFAULT_AGENT_NAMES, DEFAULT_AGENTS
from db.seed.knowledge import SHIPPED_EXPORT, parse_export, parse_lines
from db.seed.samples import SAMPLE_TASKS, SAMPLE_WORKFLOWS, seed_id
from tests.knowledge_lines import line


def test_ten_default_agents_with_everything_a_platform_agent_needs() -> None:
    assert len(DEFAULT_AGENTS) == 10 == len(DEFAULT_AGENT_NAMES)
    for agent in DEFAULT_AGENTS:
        assert agent["role"] and len(agent["description"]) > 40
        assert agent["capabilities"] and agent["config"] and agent["max_concurrent_tasks"] > 0


def test_sample_tasks_reference_known_agents_and_workflows() -> None:
    workflows = {w["name"] for w in SAMPLE_WORKFLOWS}
    for task in SAMPLE_TASKS:
        assert task["agent"] in DEFAULT_AGENT_NAMES
        assert task["workflow"] is None or task["workflow"] in workflows
    assert seed_id("task", "a") == seed_id("task", "a") != seed_id("workflow", "a")


def test_shipped_export_is_valid_and_varied() -> None:
    parsed = parse_export(SHIPPED_EXPORT)
    assert parsed.errors == []
    assert 40 <= len(parsed.records) <= 60
    assert len({r.category for r in parsed.records}) >= 6
    assert len({r.source.split(":")[0] for r in parsed.records}) >= 4
    for record in parsed.records:
        assert record.agent is None or record.agent in DEFAULT_AGENT_NAMES
        assert record.tags and "learned_at" in record.metadata and "confidence" in record.metadata


def test_good_lines_parse_and_blank_lines_are_skipped() -> None:
    parsed = parse_lines([line(), "", line(id="kb-y", agent=None)], Path("kb.jsonl"))
    assert parsed.errors == []
    assert [r.external_id for r in parsed.records] == ["kb-x", "kb-y"]
    assert parsed.records[1].line == 3 and parsed.records[1].agent is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (line(content=...), "missing field 'content'"),
        (line(colour="red"), "unknown field 'colour'"),
        (line(title=""), "field 'title' is empty"),
        (line(tags="a,b"), "field 'tags' must be list, got str"),
        (line(tags=["ok", 3]), "field 'tags' must be a list of non-empty strings"),
        (line(metadata=[]), "field 'metadata' must be dict, got list"),
        (line(id=7), "field 'id' must be string, got int"),
        (line(category="c" * 101), "field 'category' is longer than 100 characters"),
        (line(content="a\u0000b"), "field 'content' contains a NUL character"),
    ],
)
def test_bad_lines_are_reported_with_file_and_line(text: str, reason: str) -> None:
    parsed = parse_lines([line(id="kb-first"), text], Path("export.jsonl"))
    assert [r.external_id for r in parsed.records] == ["kb-first"]
    assert any(e.startswith("export.jsonl:2: ") and reason in e for e in parsed.errors), (
        parsed.errors
    )


def test_every_bad_line_is_reported_not_just_the_first() -> None:
    parsed = parse_lines(["oops", line(), line(title=""), line()], Path("f.jsonl"))
    lines = sorted({e.split(":")[1] for e in parsed.errors})
    assert lines == ["1", "3", "4"]
    assert "duplicate id 'kb-x' (first on line 2)" in parsed.errors[-1]


def test_an_empty_export_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert parse_export(tmp_path / "empty.jsonl").errors == [
        f"{tmp_path / 'empty.jsonl'}:0: no entries in the file"
    ]


def test_non_utf8_export_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(line().encode() + b"\n" + b'{"id": "caf\xe9"}\n')
    assert parse_export(path).errors == [f"{path}:2: not UTF-8 text"]


def test_password_file_is_created_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "admin-password"
    old_umask = os.umask(0)
    try:
        write_password_file(path, "generated-secret")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == "generated-secret\n"


def test_password_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "admin-password"
    path.write_text("earlier\n")
    with pytest.raises(AdminPasswordError, match="already exists") as caught:
        write_password_file(path, "generated-secret")
    assert "generated-secret" not in str(caught.value)
    assert path.read_text() == "earlier\n"


def test_admin_password_hash_is_argon2id_and_verifies() -> None:
    hashed = hash_password("correct horse battery")
    assert hashed.startswith("$argon2id$")
    assert verify_password(hashed, "correct horse battery")
    assert not verify_password(hashed, "wrong horse battery")
    assert not verify_password("not-a-hash", "correct horse battery")
