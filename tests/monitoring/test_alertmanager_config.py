"""Alertmanager: the config loads, routes by severity, inhibits warnings, and its examples work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.monitoring.tools import ALERTMANAGER_CONFIG, load_yaml, run, tool


def test_alertmanager_config_is_valid() -> None:
    result = run([tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=critical", "alertname=DbopsPostgresDown"], "dbops-critical"),
        (["severity=warning", "alertname=DbopsPoolSaturated", "pool=api"], "dbops-warning"),
        (["alertname=SomethingWithoutSeverity"], "dbops-warning"),
    ],
)
def test_alerts_route_by_severity(labels: list[str], receiver: str) -> None:
    result = run(
        [
            tool("amtool"),
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER_CONFIG}",
            *labels,
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [receiver]


def test_every_receiver_posts_to_the_sidecar_webhook_with_resolved_notifications() -> None:
    config = load_yaml(ALERTMANAGER_CONFIG)
    for receiver in config["receivers"]:
        hooks = receiver["webhook_configs"]
        assert [hook["url"] for hook in hooks] == ["http://ops:9188/alerts"], receiver["name"]
        assert all(hook["send_resolved"] for hook in hooks)


def test_critical_inhibits_the_warning_of_the_same_alert_and_target() -> None:
    config = load_yaml(ALERTMANAGER_CONFIG)
    rules = config["inhibit_rules"]
    generic = [
        rule
        for rule in rules
        if rule["source_matchers"] == ['severity="critical"']
        and rule["target_matchers"] == ['severity="warning"']
    ]
    assert generic, "no critical-inhibits-warning rule"
    assert {"alertname", "instance", "pool"} <= set(generic[0]["equal"])
    assert set(config["route"]["group_by"]) >= {"alertname", "instance"}


def test_commented_email_and_slack_examples_are_valid_when_enabled(tmp_path: Path) -> None:
    """Uncommenting the examples, with secret files that exist, gives a valid config."""
    secret = tmp_path / "secret"
    secret.write_text("not-a-real-secret\n")
    text = ALERTMANAGER_CONFIG.read_text()
    enabled = re.sub(
        r"^(\s*)# ((?:smtp_|slack_api|email_configs|slack_configs|  - to|    send_resolved"
        r"|  - channel|    title|    text).*)$",
        r"\1\2",
        text,
        flags=re.MULTILINE,
    )
    enabled = re.sub(r"/run/secrets/\w+", str(secret), enabled)
    assert "email_configs:" in enabled and "slack_configs:" in enabled
    assert enabled.count("# email_configs") == 0
    config = tmp_path / "alertmanager.yml"
    config.write_text(enabled)
    result = run([tool("amtool"), "check-config", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    loaded = load_yaml(config)
    assert all("email_configs" in r and "slack_configs" in r for r in loaded["receivers"])


TOKEN_FILE = "/run/dbops/ops_alerts_token"


def test_every_webhook_sends_the_sidecar_token_from_the_file_compose_writes() -> None:
    config = load_yaml(ALERTMANAGER_CONFIG)
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            authorization = hook["http_config"]["authorization"]
            assert authorization == {"credentials_file": TOKEN_FILE}, receiver["name"]
    compose = load_yaml(ALERTMANAGER_CONFIG.parents[2] / "docker-compose.yml")
    alertmanager = compose["services"]["alertmanager"]
    script = alertmanager["entrypoint"][2]
    assert f"> {TOKEN_FILE} " in script and "unset OPS_ALERTS_TOKEN" in script
    assert any(mount.startswith("/run/dbops:") for mount in alertmanager["tmpfs"])
    assert "OPS_ALERTS_TOKEN" in compose["services"]["ops"]["environment"]
    # the token is never written into a config or defaulted
    assert ":?" in alertmanager["environment"]["OPS_ALERTS_TOKEN"]
    assert ":?" in compose["services"]["ops"]["environment"]["OPS_ALERTS_TOKEN"]


def test_the_older_bearer_token_file_form_also_loads(tmp_path: Path) -> None:
    """Operators on older configs may use ``bearer_token_file``; amtool accepts both forms."""
    text = ALERTMANAGER_CONFIG.read_text()
    older = text.replace(
        f"authorization:\n            credentials_file: {TOKEN_FILE}",
        f"bearer_token_file: {TOKEN_FILE}",
    )
    assert older != text and "authorization:" not in older
    config = tmp_path / "alertmanager.yml"
    config.write_text(older)
    result = run([tool("amtool"), "check-config", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
