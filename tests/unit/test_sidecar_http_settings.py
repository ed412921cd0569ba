"""The sidecar's HTTP settings and its webhook token: validated up front, the token never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from db.settings import ConfigError
from ops.settings import describe, load_settings

BASE = {"DATABASE_URL": "postgresql://app:pw@db/dbops"}


def problems(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, **env})
    return error.value.problems


def test_the_token_is_never_defaulted_and_never_shown() -> None:
    assert load_settings(BASE).sidecar.alerts_token is None
    token = "s3cret-token-value-0123456789"
    settings = load_settings({**BASE, "OPS_ALERTS_TOKEN": token})
    assert settings.sidecar.alerts_token == token
    assert token not in repr(describe(settings))
    assert describe(settings)["sidecar"]["alerts_token"] == "***"


@pytest.mark.parametrize(
    "token", ["sh0rt-tqk", "h4s-sp4ce zz-w1th-in-it", "t4b\tsep4rated-tqken-x"]
)
def test_a_weak_or_unsendable_token_is_one_line_without_any_fragment(token: str) -> None:
    (line,) = problems(OPS_ALERTS_TOKEN=token)
    assert line.startswith("OPS_ALERTS_TOKEN ***: the token must be 16 to 4096")
    for fragment in token.split():
        assert fragment not in line


def test_the_token_is_read_from_a_file_without_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-token-0123456789abcdef\n")
    settings = load_settings({**BASE, "OPS_ALERTS_TOKEN_FILE": str(path)})
    assert settings.sidecar.alerts_token == "file-token-0123456789abcdef"
    path.write_text("tiny\n")
    (line,) = problems(OPS_ALERTS_TOKEN_FILE=str(path))
    assert line.startswith(f"OPS_ALERTS_TOKEN_FILE {path}: the token must be")
    assert "tiny" not in line
    (line,) = problems(OPS_ALERTS_TOKEN_FILE=str(tmp_path / "missing"))
    assert line.startswith("OPS_ALERTS_TOKEN_FILE ") and "cannot read" in line


def test_http_limits_have_defaults_and_bounds() -> None:
    sidecar = load_settings(BASE).sidecar
    assert (sidecar.http_threads, sidecar.http_connections, sidecar.http_backlog) == (8, 2000, 1024)
    assert (sidecar.http_idle_timeout, sidecar.http_deadline) == (15.0, 5.0)
    found = problems(
        OPS_HTTP_THREADS="0",
        OPS_HTTP_CONNECTIONS="1000000",
        OPS_HTTP_IDLE_TIMEOUT="500ms",
        OPS_HTTP_BACKLOG="many",
        OPS_HTTP_DEADLINE="2h",
    )
    assert [line.split(" ", 1)[0] for line in found] == [
        "OPS_HTTP_THREADS",
        "OPS_HTTP_CONNECTIONS",
        "OPS_HTTP_IDLE_TIMEOUT",
        "OPS_HTTP_BACKLOG",
        "OPS_HTTP_DEADLINE",
    ]
    assert found[-1] == "OPS_HTTP_DEADLINE 2h: must be at most 300s"
