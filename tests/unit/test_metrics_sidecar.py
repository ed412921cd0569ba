"""Pure parts of the sidecar: HTTP routing, the alert receiver, its settings."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from db.settings import ConfigError
from ops.alerts import MAX_ALERT_NAMES, AlertReceiver
from ops.http import SidecarApp
from ops.settings import load_settings

TOKEN = "t0ken-for-the-unit-tests"


def call(
    app: SidecarApp,
    method: str,
    path: str,
    body: bytes = b"",
    content_type: str = "application/json",
    token: str | None = TOKEN,
) -> tuple[str, Any]:
    captured: dict[str, str] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        captured["status"] = status

    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "QUERY_STRING": "",
        "CONTENT_TYPE": content_type,
    }
    if token is not None:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    out = b"".join(app(environ, start_response))
    return captured["status"], out.decode()


def make_app(healthy: bool = True, ready: bool = True) -> tuple[SidecarApp, CollectorRegistry]:
    registry = CollectorRegistry()
    alerts = AlertReceiver()
    registry.register(alerts)
    app = SidecarApp(
        registry,
        lambda: (healthy, {"healthy": healthy, "problems": [] if healthy else ["boom"]}),
        lambda: (ready, {"ready": ready}),
        alerts,
        alerts_token=TOKEN,
    )
    return app, registry


def test_health_and_readiness_map_to_200_or_503() -> None:
    app, _ = make_app(healthy=True, ready=False)
    assert call(app, "GET", "/healthz")[0].startswith("200")
    status, body = call(app, "GET", "/readyz")
    assert status.startswith("503") and json.loads(body) == {"ready": False}
    app, _ = make_app(healthy=False)
    status, body = call(app, "GET", "/healthz")
    assert status.startswith("503") and json.loads(body)["problems"] == ["boom"]


def test_unknown_paths_and_wrong_methods_are_refused() -> None:
    app, _ = make_app()
    assert call(app, "GET", "/admin")[0].startswith("404")
    assert call(app, "POST", "/metrics")[0].startswith("405")
    assert call(app, "GET", "/alerts")[0].startswith("405")
    assert call(app, "POST", "/alerts", b"")[0].startswith("400")
    assert call(app, "POST", "/alerts", b"[1, 2]")[0].startswith("400")


def test_alerts_are_counted_by_name_and_status() -> None:
    app, registry = make_app()
    payload = {
        "status": "firing",
        "alerts": [
            {"status": "firing", "labels": {"alertname": "DbopsPoolTimeouts"}},
            {"status": "firing", "labels": {"alertname": "DbopsPoolTimeouts"}},
            {"labels": {"alertname": "DbopsSlowQueries"}},
        ],
    }
    status, body = call(app, "POST", "/alerts", json.dumps(payload).encode())
    assert status.startswith("200") and json.loads(body) == {"received": 3}
    get = registry.get_sample_value
    labels = {"alertname": "DbopsPoolTimeouts", "status": "firing"}
    assert get("dbops_alerts_received_total", labels) == 2
    assert get("dbops_alerts_received_total", {**labels, "alertname": "DbopsSlowQueries"}) == 1
    assert b"dbops_alerts_received_total" in generate_latest(registry)


def test_alert_names_beyond_the_cap_fold_into_other() -> None:
    receiver = AlertReceiver()
    alerts = [{"status": "firing", "labels": {"alertname": f"A{i}"}} for i in range(250)]
    receiver.receive({"alerts": alerts})
    names = {
        s.labels["alertname"]
        for family in receiver.collect()
        if family.name == "dbops_alerts_received"
        for s in family.samples
    }
    assert len(names) == MAX_ALERT_NAMES + 1 and "(other)" in names


def test_monitor_url_is_validated_and_read_from_a_file(tmp_path: Path) -> None:
    base = {"DATABASE_URL": "postgresql://app:pw@db/dbops"}
    with pytest.raises(ConfigError) as error:
        load_settings({**base, "MONITOR_DATABASE_URL": "mysql://m:secret@db/x"})
    assert error.value.problems == [
        "MONITOR_DATABASE_URL mysql://m:***@db/x: must be a postgresql:// URL"
    ]
    secret = tmp_path / "monitor-url"
    secret.write_text("postgresql://mon:s3cret@db/dbops\n")
    settings = load_settings({**base, "MONITOR_DATABASE_URL_FILE": str(secret)})
    assert settings.sidecar.monitor_url is not None
    assert settings.sidecar.monitor_url.username == "mon"
    assert settings.sidecar.application_name == "dbops-sidecar"
    assert load_settings(base).sidecar.monitor_url is None
