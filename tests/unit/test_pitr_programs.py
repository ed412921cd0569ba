"""PITR_DIR/bin: the pg_receivewal Barman runs adds --synchronous and --status-interval=1 to
the real program and passes every argument through unchanged; the directory is private and
rewritten at each start."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from ops.pitr.config import barman_config
from ops.pitr.programs import ProgramsError, receivewal_wrapper, write_programs
from ops.pitr.settings import PitrSettings

# Stands in for the real pg_receivewal: prints each argument it got on a line of its own.
ECHO = '#!/bin/sh\nprintf "%s\\n" "$0" "$@"\n'


def fake_bindir(root: Path) -> Path:
    bindir = root / "pg bin's"  # a space and a quote: the wrapper must quote the path
    bindir.mkdir()
    program = bindir / "pg_receivewal"
    program.write_text(ECHO)
    program.chmod(0o755)
    (bindir / "pg_dump").write_text("")
    return bindir


def run(wrapper: Path, *args: str) -> list[str]:
    result = subprocess.run(
        [str(wrapper), *args], capture_output=True, text=True, check=True, timeout=10
    )
    return result.stdout.splitlines()


def test_wrapper_adds_synchronous_and_status_interval_and_passes_arguments_unchanged(
    tmp_path: Path,
) -> None:
    bindir = fake_bindir(tmp_path)
    prefix = write_programs(tmp_path / "bin", bindir)
    assert prefix == f"{tmp_path / 'bin'}:{bindir}"
    hostile = ["--dbname=host='a b' application_name=x", "$HOME", "`id`", "a\\b", "", "--"]
    assert run(tmp_path / "bin" / "pg_receivewal", "--verbose", *hostile) == [
        str(bindir / "pg_receivewal"),
        "--synchronous",
        "--status-interval=1",
        "--verbose",
        *hostile,
    ]


@pytest.mark.parametrize("first", ["--version", "-V", "--help", "-?"])
def test_wrapper_leaves_version_and_help_first_as_pg_receivewal_requires(
    tmp_path: Path, first: str
) -> None:
    """pg_receivewal reads --version only as its first argument; Barman's check runs it."""
    bindir = fake_bindir(tmp_path)
    write_programs(tmp_path / "bin", bindir)
    assert run(tmp_path / "bin" / "pg_receivewal", first) == [
        str(bindir / "pg_receivewal"),
        first,
    ]


def test_programs_directory_is_private_and_rewritten_at_each_start(tmp_path: Path) -> None:
    bindir = fake_bindir(tmp_path)
    directory = tmp_path / "bin"
    directory.mkdir(mode=0o755)
    (directory / "pg_receivewal").write_text("#!/bin/sh\necho tampered\n")
    os.chmod(directory / "pg_receivewal", 0o777)
    write_programs(directory, bindir)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    wrapper = directory / "pg_receivewal"
    assert stat.S_IMODE(wrapper.lstat().st_mode) == 0o700
    assert wrapper.read_text() == receivewal_wrapper(bindir / "pg_receivewal")
    assert "tampered" not in wrapper.read_text()


def test_a_symlinked_programs_directory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "bin").symlink_to(elsewhere)
    with pytest.raises(ProgramsError, match="is a symlink"):
        write_programs(tmp_path / "bin", fake_bindir(tmp_path))
    assert list(elsewhere.iterdir()) == []


def test_no_wrapper_when_the_real_program_is_missing(tmp_path: Path) -> None:
    bindir = fake_bindir(tmp_path)
    write_programs(tmp_path / "bin", bindir)
    (bindir / "pg_receivewal").unlink()
    write_programs(tmp_path / "bin", bindir)  # Barman then reports pg_receivewal missing
    assert not (tmp_path / "bin" / "pg_receivewal").exists()


def test_the_wrapper_on_path_never_wraps_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "bin"
    write_programs(directory, fake_bindir(tmp_path))
    monkeypatch.setenv("PATH", str(directory))  # only the wrapper is on PATH
    assert write_programs(directory, None) == str(directory)
    assert not (directory / "pg_receivewal").exists()


def test_barman_searches_the_programs_directory_first(tmp_path: Path) -> None:
    bindir = fake_bindir(tmp_path)
    settings = PitrSettings(enabled=True, directory=tmp_path / "pitr")
    prefix = write_programs(settings.programs_dir, bindir)
    url = make_url("postgresql://dbops_backup:secret@db:5432/dbops")
    text = barman_config(settings, url, os_user="dbops", path_prefix=prefix)
    assert f"path_prefix = {settings.programs_dir}:{bindir}\n" in text.replace("%%", "%")
