"""Which timeline the archive and streaming hold: going back after a recovery is recognised,
and a recovery to the latest point follows the timeline archived last, not the highest."""

from __future__ import annotations

from pathlib import Path

from ops.pitr.settings import SERVER_NAME, PitrSettings
from ops.pitr.status import PitrStatus, latest_archived_timeline, went_back


def settings_in(directory: Path) -> PitrSettings:
    return PitrSettings(enabled=True, directory=directory)


def streamed(settings: PitrSettings, *names: str) -> None:
    directory = settings.barman_home / SERVER_NAME / "streaming"
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).touch()


def test_a_server_on_an_earlier_timeline_than_streaming_holds_went_back(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    streamed(settings, "000000030000000000000009.partial", "00000002000000000000000A")
    assert went_back(PitrStatus(0.0, current_wal="00000002000000000000000B"), settings)
    assert not went_back(PitrStatus(0.0, current_wal="00000003000000000000000B"), settings)
    assert not went_back(PitrStatus(0.0, current_wal="00000004000000000000000B"), settings)
    assert not went_back(PitrStatus(0.0, current_wal=None), settings)


def test_history_files_and_other_names_in_streaming_do_not_count(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    streamed(settings, "00000003.history", "000000030000000000000009.partial.tmp", "notes")
    assert not went_back(PitrStatus(0.0, current_wal="00000001000000000000000B"), settings)


def test_latest_timeline_is_the_one_archived_last_by_close_time(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    wals = settings.barman_home / SERVER_NAME / "wals"
    wals.mkdir(parents=True)
    assert latest_archived_timeline(settings) is None
    (wals / "xlog.db").write_text(
        "000000020000000000000005 16777216 100.0 None\n"
        "00000003.history 42 150.0 None\n"
        "000000030000000000000009 16777216 200.0 None\n"  # the abandoned later timeline
        "000000020000000000000006 16777216 300.0 None\n"  # written after going back
        "000000020000000000000006.00000028.backup 300 301.0 None\n"
        "garbage line\n"
    )
    assert latest_archived_timeline(settings) == 2
