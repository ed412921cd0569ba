"""The ``ops`` entry point: each command's module loads only when that command runs."""

from __future__ import annotations

import subprocess
import sys

from ops.cli import COMMAND_MODULES, build_parser


def _modules_loaded_for(command: str) -> set[str]:
    probe = (
        "import sys; from ops.cli import build_parser; "
        f"build_parser({command!r}); print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def test_backup_command_does_not_import_migrations_or_seed() -> None:
    loaded = _modules_loaded_for("backup")
    assert "ops.commands.backup" in loaded
    assert not {"alembic", "ops.commands.db", "db.seed.run"} & loaded


def test_help_and_unknown_commands_know_every_command() -> None:
    parser = build_parser(None)
    help_text = parser.format_help()
    for command in COMMAND_MODULES:
        assert command in help_text
    unknown = subprocess.run(
        [sys.executable, "-m", "ops.cli", "bogus"], capture_output=True, text=True, check=False
    )
    assert unknown.returncode == 2
    assert all(command in unknown.stderr for command in COMMAND_MODULES)
