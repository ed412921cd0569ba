"""POST /alerts against hostile input: refused whole, one JSON line, nothing kept without bound."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ops.alerts import (
    MAX_ALERT_BODY,
    MAX_ALERT_NAMES,
    MAX_ALERTS,
    MAX_LABEL_VALUE,
    AlertReceiver,
    printable,
    token_matches,
)
from ops.http import SidecarApp

TOKEN = "0123456789abcdef-webhook"


def make_app(token: str | None = TOKEN) -> tuple[SidecarApp, AlertReceiver, CollectorRegistry]:
    registry = CollectorRegistry()
    receiver = AlertReceiver()
    registry.register(receiver)
    app = SidecarApp(
        registry,
        lambda: (True, {"healthy": True}),
        lambda: (True, {"ready": True}),
        receiver,
        alerts_token=token,
    )
    return app, receiver, registry


def post(
    app: SidecarApp,
    body: bytes,
    *,
    authorization: str | None = f"Bearer {TOKEN}",
    content_type: str = "application/json",
    length: str | None = None,
) -> tuple[int, dict[str, str], str]:
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        captured["status"] = int(status.split()[0])
        captured["headers"] = dict(headers)

    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/alerts",
        "CONTENT_TYPE": content_type,
        "CONTENT_LENGTH": str(len(body)) if length is None else length,
        "wsgi.input": io.BytesIO(body),
    }
    if authorization is not None:
        environ["HTTP_AUTHORIZATION"] = authorization
    out = b"".join(app(environ, start_response)).decode()
    return captured["status"], captured["headers"], out


def alert(name: str = "DbopsPostgresDown", **extra: Any) -> dict[str, Any]:
    return {
        "status": "firing",
        "labels": {"alertname": name, "severity": "critical"},
        "annotations": {"summary": "PostgreSQL is down"},
        **extra,
    }


def payload(*alerts: dict[str, Any]) -> bytes:
    return json.dumps({"version": "4", "status": "firing", "alerts": list(alerts)}).encode()


def assert_one_line_error(status: int, body: str, expected: int) -> dict[str, Any]:
    assert status == expected, body
    assert "\n" not in body and "Traceback" not in body
    error: dict[str, Any] = json.loads(body)
    assert set(error) == {"error"} and error["error"]
    return error


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (payload(alert(labels=["alertname", "X"])), "alerts[0].labels: must be a mapping"),
        (payload(alert(labels={"alertname": {"nested": "x"}})), "alerts[0].labels.alertname"),
        (payload(alert(annotations="text")), "alerts[0].annotations: must be a mapping"),
        (payload(alert(status=7)), "alerts[0].status: must be a string"),
        (payload("not an alert"), "alerts[0]: must be an object"),  # type: ignore[arg-type]
        (b'{"alerts": {"a": 1}}', "alerts: must be a list"),
        (b"[1, 2]", "payload: must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"alerts": [' + b"[" * 500 + b"]" * 500 + b"]}", "alerts[0]: must be an object"),
        (b"{not json", "not JSON"),
        (b'{"alerts": []}\xff\xfe', "not JSON"),
        (b'{"alerts": [], "n": ' + b"9" * 5000 + b"}", "not JSON"),
        (payload(alert(labels={"alertname": "\ud800"})), "not valid Unicode"),
        (payload(alert(labels={"k" * 300: "v"})), "a key: longer than 256"),
        (payload(alert(labels={"team": "v" * (MAX_LABEL_VALUE + 1)})), "longer than 1024"),
        (payload(alert(labels={f"l{i}": "v" for i in range(65)})), "more than 64 entries"),
        (payload(*[alert()] * (MAX_ALERTS + 1)), f"more than {MAX_ALERTS} in one post"),
    ],
)
def test_odd_payloads_get_400_with_one_line_naming_the_field_and_change_no_count(
    body: bytes, fragment: str
) -> None:
    app, _, registry = make_app()
    status, _, out = post(app, body)
    error = assert_one_line_error(status, out, 400)
    assert fragment in error["error"]
    assert registry.get_sample_value("dbops_alerts_rejected_total", {"reason": "bad_payload"}) == 1
    assert b"dbops_alerts_received_total{" not in generate_latest(registry)


def test_a_bad_alert_after_good_ones_rejects_the_whole_post() -> None:
    app, _, registry = make_app()
    status, _, _ = post(app, payload(alert(), alert(), alert(labels="x")))
    assert status == 400
    assert b"dbops_alerts_received_total{" not in generate_latest(registry)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "", "application/jsonx"]
)
def test_a_wrong_content_type_is_refused(content_type: str) -> None:
    app, _, _ = make_app()
    status, _, out = post(app, payload(alert()), content_type=content_type)
    assert "Content-Type" in assert_one_line_error(status, out, 400)["error"]


def test_json_with_a_charset_parameter_is_accepted() -> None:
    app, _, _ = make_app()
    status, _, out = post(app, payload(alert()), content_type="application/json; charset=utf-8")
    assert status == 200 and json.loads(out) == {"received": 1}


def test_a_body_over_the_cap_is_413_before_it_is_read() -> None:
    app, _, registry = make_app()
    status, _, out = post(app, b"{}", length=str(MAX_ALERT_BODY + 1))
    assert_one_line_error(status, out, 413)
    assert registry.get_sample_value("dbops_alerts_rejected_total", {"reason": "too_large"}) == 1
    for length in ("0", "-5", "ten"):
        status, _, out = post(app, b"", length=length)
        assert_one_line_error(status, out, 400)


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong-token-of-some-length", f"Basic {TOKEN}", f"Bearer {TOKEN}x"],
)
def test_posts_without_the_right_bearer_token_are_401_and_not_counted(
    authorization: str | None,
) -> None:
    app, _, registry = make_app()
    status, headers, out = post(app, payload(alert()), authorization=authorization)
    assert_one_line_error(status, out, 401)
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert TOKEN not in out
    assert registry.get_sample_value("dbops_alerts_rejected_total", {"reason": "unauthorized"}) == 1
    assert b"dbops_alerts_received_total{" not in generate_latest(registry)


def test_the_scheme_is_case_insensitive_as_http_says() -> None:
    assert token_matches(f"bearer {TOKEN}", TOKEN)
    assert token_matches(f"  Bearer   {TOKEN}  ", TOKEN)
    assert not token_matches(f"Bearer {TOKEN[:-1]}", TOKEN)
    assert not token_matches("Bearer \udcff", TOKEN)


def test_without_a_configured_token_the_webhook_is_off() -> None:
    app, _, registry = make_app(token=None)
    status, _, out = post(app, payload(alert()))
    assert "OPS_ALERTS_TOKEN" in assert_one_line_error(status, out, 403)["error"]
    assert registry.get_sample_value("dbops_alerts_rejected_total", {"reason": "disabled"}) == 1


def test_a_newline_in_a_summary_cannot_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    app, _, _ = make_app()
    forged = "disk fine\n2026-11-28T03:00:00 INFO    ops.backup: backup ok\r\x1b[2J\u2028x"
    body = payload(alert(annotations={"summary": forged}, labels={"alertname": "A\nB"}))
    with caplog.at_level(logging.WARNING, logger="ops.alerts"):
        assert post(app, body)[0] == 200
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message and "\r" not in message and "\x1b" not in message
    assert "\u2028" not in message
    assert "disk fine\\x0a2026-11-28T03:00:00 INFO" in message
    assert "A\\x0aB" in message


def test_printable_escapes_and_truncates() -> None:
    assert printable("tab\there") == "tab\\x09here"
    assert printable("nul\x00") == "nul\\x00"
    assert printable("é ü ok") == "é ü ok"
    assert printable("\u2029") == "\\u2029"
    assert printable("x" * 400, 10) == "x" * 10 + "...(+390 chars)"


def test_two_hundred_posts_with_huge_labels_keep_metrics_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The cap holds names and series, whatever the posts carry."""
    app, receiver, registry = make_app()
    big = "v" * MAX_LABEL_VALUE
    with caplog.at_level(logging.ERROR, logger="ops.alerts"):
        for post_number in range(200):
            alerts = [
                alert(
                    name=f"Name{post_number}_{i}_{'x' * 100}",
                    labels={
                        "alertname": f"Name{post_number}_{i}_{'x' * 100}",
                        **{f"label{j}": big for j in range(60)},
                    },
                    annotations={"summary": big * 4},
                )
                for i in range(3)
            ]
            body = payload(*alerts)
            assert len(body) < MAX_ALERT_BODY
            assert post(app, body)[0] == 200
    exposition = generate_latest(registry)
    names = {
        sample.labels["alertname"]
        for family in receiver.collect()
        if family.name == "dbops_alerts_received"
        for sample in family.samples
    }
    assert len(names) == MAX_ALERT_NAMES + 1 and "(other)" in names
    assert len(exposition) < 64 * 1024, len(exposition)
    total = sum(
        sample.value
        for family in registry.collect()
        if family.name == "dbops_alerts_received"
        for sample in family.samples
    )
    assert total == 600


def test_alert_names_that_are_not_names_count_as_other() -> None:
    receiver = AlertReceiver()
    receiver.receive({"alerts": [alert(name="has space"), alert(name="x" * 200), alert()]})
    names = {
        s.labels["alertname"]
        for family in receiver.collect()
        if family.name == "dbops_alerts_received"
        for s in family.samples
    }
    assert names == {"(other)", "DbopsPostgresDown"}
