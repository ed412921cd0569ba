"""The head revision read from the files' headers agrees with Alembic's own graph."""

from __future__ import annotations

from pathlib import Path

import pytest

from db import migrate
from db.revisions import RevisionGraphError, head_revision


def test_head_revision_from_headers_is_alembics_head() -> None:
    assert head_revision() == migrate.head_revision()


def write(directory: Path, name: str, revision: str, down: str | None) -> None:
    (directory / f"{name}.py").write_text(
        f'"""{name}"""\nrevision: str = {revision!r}\ndown_revision: str | None = {down!r}\n'
    )


def test_head_is_the_revision_nothing_builds_on(tmp_path: Path) -> None:
    write(tmp_path, "a", "0001", None)
    write(tmp_path, "c", "0003", "0002")
    write(tmp_path, "b", "0002", "0001")
    assert head_revision(tmp_path) == "0003"


def test_two_heads_or_no_revisions_are_errors(tmp_path: Path) -> None:
    with pytest.raises(RevisionGraphError, match="no revisions"):
        head_revision(tmp_path)
    write(tmp_path, "a", "0001", None)
    write(tmp_path, "b", "0002", "0001")
    write(tmp_path, "c", "0003", "0001")
    with pytest.raises(RevisionGraphError, match=r"one head revision, found \['0002', '0003'\]"):
        head_revision(tmp_path)


def test_the_sidecar_imports_neither_alembic_nor_the_orm() -> None:
    """Each costs megabytes of resident memory in a process that runs for months."""
    import subprocess
    import sys

    probe = (
        "import sys, ops.commands.serve, ops.daemon, ops.collectors.exporter, "
        "ops.backup.service, ops.http, db.metrics, db.revisions; "
        "print(sorted({m.split('.')[0] + ('.orm' if m.startswith('sqlalchemy.orm') else '') "
        "for m in sys.modules if m.startswith(('alembic', 'sqlalchemy.orm', 'mako'))}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"
