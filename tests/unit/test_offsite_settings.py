"""OFFSITE_* settings: every bad value one line, credentials never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from db.settings import ConfigError, EnvReader
from ops.offsite.settings import read_offsite_settings
from ops.settings import describe, load_settings

BASE = {"DATABASE_URL": "postgresql://app:pw@db:5432/app"}


def offsite(env: dict[str, str]):  # type: ignore[no-untyped-def]
    reader = EnvReader(env)
    settings = read_offsite_settings(reader)
    reader.finish()
    return settings


def test_without_a_url_off_host_copying_is_off() -> None:
    assert not offsite({}).enabled


def test_url_gives_bucket_prefix_and_keys() -> None:
    settings = offsite({"OFFSITE_S3_URL": "s3://backups.example/site-a/dbops/"})
    assert settings.enabled
    assert (settings.bucket, settings.prefix) == ("backups.example", "site-a/dbops")
    assert settings.key("dumps", "app", "x.dump") == "site-a/dbops/dumps/app/x.dump"
    assert offsite({"OFFSITE_S3_URL": "s3://bucket"}).key("dumps") == "dumps"


@pytest.mark.parametrize(
    "url",
    [
        "https://bucket/prefix",
        "s3://Bucket_Upper/x",
        "s3://ab/x",
        "s3://bucket/a/../b",
        "s3://bucket/a//b",
        "s3://bucket/x?y=1",
        "s3://key:secret@bucket/x",
        "s3://bucket/\x1b[2J",
    ],
)
def test_a_bad_url_is_one_line(url: str) -> None:
    with pytest.raises(ConfigError) as error:
        offsite({"OFFSITE_S3_URL": url})
    assert len(error.value.problems) == 1
    assert error.value.problems[0].startswith("OFFSITE_S3_URL ")
    assert "secret" not in error.value.problems[0]


@pytest.mark.parametrize(
    "endpoint", ["ftp://store", "http://", "http://u:p@store:9000", "http://store:99999"]
)
def test_a_bad_endpoint_is_one_line(endpoint: str) -> None:
    with pytest.raises(ConfigError) as error:
        offsite({"OFFSITE_S3_URL": "s3://bucket", "OFFSITE_S3_ENDPOINT_URL": endpoint})
    assert len(error.value.problems) == 1
    assert "p@" not in error.value.problems[0]


def test_one_key_of_the_pair_alone_is_refused_and_neither_is_shown() -> None:
    with pytest.raises(ConfigError) as error:
        offsite({"OFFSITE_S3_URL": "s3://bucket", "AWS_ACCESS_KEY_ID": "AKIASHOWNOWHERE"})
    assert error.value.problems == [
        "AWS_SECRET_ACCESS_KEY (unset): is needed with the other key of the pair (or its _FILE)"
    ]


def test_keys_come_from_files_and_stay_out_of_config_show(tmp_path: Path) -> None:
    key_id, secret = tmp_path / "id", tmp_path / "secret"
    key_id.write_text("AKIAFROMFILE\n")
    secret.write_text("s3cr3t-from-file\n")
    settings = load_settings(
        {
            **BASE,
            "OFFSITE_S3_URL": "s3://bucket/p",
            "AWS_ACCESS_KEY_ID_FILE": str(key_id),
            "AWS_SECRET_ACCESS_KEY_FILE": str(secret),
        }
    )
    assert settings.offsite.environment()["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-from-file"
    shown = str(describe(settings))
    assert "s3cr3t-from-file" not in shown and "AKIAFROMFILE" not in shown


@pytest.mark.parametrize("value", ["12h", "0d", "99999d", "soon"])
def test_retention_is_whole_days_within_bounds(value: str) -> None:
    with pytest.raises(ConfigError) as error:
        offsite({"OFFSITE_S3_URL": "s3://bucket", "OFFSITE_RETENTION": value})
    assert error.value.problems[0].startswith("OFFSITE_RETENTION ")
    assert offsite({"OFFSITE_RETENTION": "30d"}).retention_days == 30
