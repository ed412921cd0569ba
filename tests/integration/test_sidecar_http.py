"""The sidecar's HTTP face under hostile and heavy traffic, on loopback, against ``ops serve``.

Each test prints its figures (``-s`` shows them). Bounded: at most 1,000 sockets, 150 scrapers,
200 posts, and every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from tests.integration.test_daemon import ALERTS_TOKEN, Sidecar, migrated_cluster, sidecar
from tests.integration.test_exporter_frozen import cluster_pids
from tests.pgcluster import Cluster, wait_for


def address(running: Sidecar) -> tuple[str, int]:
    host, port = running.base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def request(
    running: Sidecar,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 15,
) -> tuple[int, str, float]:
    """One request on a new connection: status, body, seconds taken."""
    started = time.monotonic()
    connection = http.client.HTTPConnection(*address(running), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode(), time.monotonic() - started
    finally:
        connection.close()


def sample(body: str, name: str) -> float | None:
    for line in body.splitlines():
        if line.split(" ")[0] == name:
            return float(line.split(" ")[1])
    return None


def sockets(pid: int) -> int:
    """Sockets the process holds: its listener, database connections, HTTP connections."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            continue
    return count


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def post_alerts(running: Sidecar, body: bytes, token: str = ALERTS_TOKEN) -> tuple[int, str]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    status, text, _ = request(running, "POST", "/alerts", body, headers)
    return status, text


def test_a_thousand_idle_connections_do_not_stop_probes_or_scrapes(migrated_db: URL) -> None:
    with sidecar(migrated_db, OPS_HTTP_IDLE_TIMEOUT="60s") as running:
        assert wait_for(lambda: running.metric("dbops_pg_up") == 1, 15), running.stderr()
        held = []
        try:
            for number in range(1000):
                idle = socket.create_connection(address(running), timeout=5)
                if number % 2:  # half of them start a request and never finish its headers
                    idle.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                held.append(idle)
            # the server has accepted and holds every one of them
            assert wait_for(lambda: sockets(running.process.pid) > 1000, 20)
            open_sockets = sockets(running.process.pid)
            timings = {}
            for path in ("/healthz", "/readyz", "/metrics", "/healthz"):
                status, body, took = request(running, "GET", path, timeout=10)
                assert status == 200, (path, body)
                timings[path] = took
            assert sample(body, "dbops_pg_up") is None  # the last one was /healthz
            status, body, _ = request(running, "GET", "/metrics")
            assert sample(body, "dbops_pg_up") == 1
        finally:
            for idle in held:
                idle.close()
        print(
            f"\n1,000 held connections: sidecar sockets {open_sockets}; "
            + ", ".join(f"{path} {took * 1000:.0f} ms" for path, took in timings.items())
        )
        assert max(timings.values()) < 3, timings
        assert running.get("/healthz")[0] == 200


def test_150_concurrent_scrapers_all_get_answers_and_no_false_down(migrated_db: URL) -> None:
    with sidecar(migrated_db) as running:
        assert wait_for(lambda: running.metric("dbops_pg_up") == 1, 15), running.stderr()
        before = sample(running.get("/metrics")[1], "dbops_probe_duration_seconds_count")
        start = threading.Barrier(150)
        results: list[tuple[int, float | None, float]] = []
        lock = threading.Lock()

        def scrape() -> None:
            start.wait(10)
            try:
                status, body, took = request(running, "GET", "/metrics", timeout=30)
                up = sample(body, "dbops_pg_up")
            except OSError:
                status, up, took = 0, None, 30.0
            with lock:
                results.append((status, up, took))

        scrapers = [threading.Thread(target=scrape) for _ in range(150)]
        started = time.monotonic()
        for scraper in scrapers:
            scraper.start()
        for scraper in scrapers:
            scraper.join(60)
        wall = time.monotonic() - started
        after = sample(running.get("/metrics")[1], "dbops_probe_duration_seconds_count")
        assert before is not None and after is not None
        took = sorted(t for _, _, t in results)
        print(
            f"\n150 concurrent scrapes: {wall:.2f} s wall, median {took[75] * 1000:.0f} ms, "
            f"max {took[-1] * 1000:.0f} ms, {after - before - 1:.0f} collections for 150 scrapes"
        )
        assert len(results) == 150
        assert [status for status, _, _ in results] == [200] * 150
        assert [up for _, up, _ in results] == [1.0] * 150  # never a false dbops_pg_up 0
        assert after - before - 1 < 150  # concurrent scrapes shared collections
        assert "database unreachable" not in running.stderr()


def test_half_sent_requests_never_run(migrated_db: URL) -> None:
    with sidecar(migrated_db) as running:
        assert wait_for(lambda: running.metric("dbops_pg_up") == 1, 15), running.stderr()
        first = sample(request(running, "GET", "/metrics")[1], "dbops_probe_duration_seconds_count")
        for number in range(60):
            cut = socket.create_connection(address(running), timeout=5)
            if number % 3 == 0:
                cut.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers not finished
            elif number % 3 == 1:
                cut.sendall(b"GET /metr")
                cut.shutdown(socket.SHUT_WR)  # half-closed mid-request line
            else:  # a whole set of headers, then half of the declared body
                body = json.dumps({"alerts": [{"labels": {"alertname": "Forged"}}]}).encode()
                cut.sendall(
                    b"POST /alerts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {ALERTS_TOKEN}\r\n".encode()
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body[: len(body) // 2]
                )
            time.sleep(0.01)
            cut.close()
        time.sleep(1)
        _, body, _ = request(running, "GET", "/metrics")
        second = sample(body, "dbops_probe_duration_seconds_count")
        assert first is not None and second is not None
        print(f"\n60 cut-off requests: exporter probes before {first:.0f}, after {second:.0f}")
        assert second - first == 1  # only the scrape that just answered
        assert "Forged" not in body and "Forged" not in running.stderr()
        assert "Traceback" not in running.stderr()


def test_webhook_posts_are_authenticated_capped_and_logged_one_line_each(
    migrated_db: URL,
) -> None:
    with sidecar(migrated_db) as running:
        good = {"alerts": [{"status": "firing", "labels": {"alertname": "DbopsDeadlocks"}}]}
        body = json.dumps(good).encode()
        assert post_alerts(running, body, token="not-the-token-at-all")[0] == 401
        status, text, _ = request(
            running, "POST", "/alerts", body, {"Content-Type": "application/json"}
        )
        assert status == 401 and ALERTS_TOKEN not in text
        forged = "fine\n2026-11-28T03:00:00 INFO    ops.backup: backup 20261128 ok"
        summary = {"status": "firing", "labels": {"alertname": "DbopsBackupFailed"}}
        summary["annotations"] = {"summary": forged}  # type: ignore[assignment]
        assert post_alerts(running, json.dumps({"alerts": [summary]}).encode())[0] == 200
        nested = b'{"alerts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        status, text = post_alerts(running, nested)
        assert status == 400 and json.loads(text) == {"error": "payload: nested too deeply"}
        odd = {"alerts": [{"labels": ["alertname", "X"]}]}
        status, text = post_alerts(running, json.dumps(odd).encode())
        assert status == 400 and "\n" not in text and "must be a mapping" in text
        status, _ = post_alerts(running, b"{" + b" " * (256 * 1024) + b"}")
        assert status == 413
        metrics = running.get("/metrics")[1]
        running.process.send_signal(signal.SIGTERM)
        stop_code = running.process.wait(20)
        log = running.stderr()
    assert stop_code == 0
    assert 'dbops_alerts_rejected_total{reason="unauthorized"} 2.0' in metrics
    assert 'dbops_alerts_rejected_total{reason="bad_payload"} 2.0' in metrics
    assert "Traceback" not in log and ALERTS_TOKEN not in log
    lines = [line for line in log.splitlines() if "DbopsBackupFailed" in line]
    assert len(lines) == 1 and "fine\\x0a2026-11-28T03:00:00 INFO" in lines[0]
    assert not any(line.startswith("2026-11-28T03:00:00") for line in log.splitlines())


def test_two_hundred_posts_with_huge_labels_grow_neither_metrics_nor_memory(
    migrated_db: URL,
) -> None:
    with sidecar(migrated_db) as running:
        assert wait_for(lambda: running.metric("dbops_pg_up") == 1, 15), running.stderr()
        baseline_size = len(running.get("/metrics")[1])
        for _ in range(3):  # warm up the paths a post takes
            post_alerts(running, json.dumps({"alerts": []}).encode())
        rss_before = rss_kib(running.process.pid)
        big = "v" * 1024
        refused = accepted = 0
        for number in range(200):
            alerts = [
                {
                    "status": "firing",
                    "labels": {
                        "alertname": f"Huge{number}_{i}",
                        **{f"label{j}": big for j in range(60)},
                    },
                    "annotations": {"summary": big * 8},
                }
                for i in range(3)
            ]
            if number % 2:  # and every other one far past the caps
                alerts[0]["labels"]["huge"] = "x" * 200_000  # type: ignore[index]
            status, _ = post_alerts(running, json.dumps({"alerts": alerts}).encode())
            accepted += status == 200
            refused += status in (400, 413)
        metrics = running.get("/metrics")[1]
        rss_after = rss_kib(running.process.pid)
        growth = len(metrics) - baseline_size
        print(
            f"\n200 posts with huge labels: {accepted} accepted, {refused} refused; /metrics "
            f"{baseline_size} -> {len(metrics)} bytes; RSS {rss_before // 1024} -> "
            f"{rss_after // 1024} MiB"
        )
        assert accepted == 100 and refused == 100
        assert growth < 64 * 1024, growth
        assert rss_after - rss_before < 40 * 1024, (rss_before, rss_after)
        assert 'alertname="(other)"' in metrics  # the names past the cap fold into one series
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(20) == 0


@pytest.fixture
def frozen_cluster() -> Iterator[Cluster]:
    """A cluster of this test's own: it is frozen (SIGSTOP), which others must not see."""
    with migrated_cluster() as cluster:
        try:
            yield cluster
        finally:
            for pid in cluster_pids(cluster):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)


def test_endpoints_answer_by_their_deadline_and_sigterm_exits_fast_on_a_frozen_server(
    frozen_cluster: Cluster,
) -> None:
    ttl = 20.0  # the refresh job waits up to 33 s for a frozen server
    with sidecar(frozen_cluster.url(), OPS_COLLECTOR_TTL="20s") as running:
        started = time.monotonic()  # about when the first refresh ran
        assert wait_for(lambda: running.metric("dbops_pg_up") == 1, 15), running.stderr()
        assert running.get("/readyz")[0] == 200  # its pooled connection is open
        # The startup backup is done: a row count cancelled on a frozen server freezes the
        # interpreter (see the watchdog test below), which this test is not about.
        assert wait_for(lambda: running.metric("dbops_backup_in_progress") == 0, 30)
        frozen = cluster_pids(frozen_cluster)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)

        status, body, readyz_first = request(running, "GET", "/readyz")
        assert status == 503, body
        (problem,) = json.loads(body)["problems"]
        assert "readiness check gave no answer within 5s" in problem
        status, _, readyz_again = request(running, "GET", "/readyz")
        assert status == 503
        status, _, healthz = request(running, "GET", "/healthz")
        assert status == 200
        status, body, metrics = request(running, "GET", "/metrics")
        assert status == 200 and sample(body, "dbops_pg_up") == 0

        time.sleep(max(0.0, started + ttl + 2 - time.monotonic()))  # a refresh is now stuck
        threads = len(os.listdir(f"/proc/{running.process.pid}/task"))
        signalled = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        try:
            code = running.process.wait(30)
        except subprocess.TimeoutExpired:
            tasks = Path(f"/proc/{running.process.pid}/task")
            states = [(t / "stat").read_text().split(")")[1].split()[0] for t in tasks.iterdir()]
            raise AssertionError(f"{states}\n{running.stderr()}") from None
        exit_seconds = time.monotonic() - signalled
        log = running.stderr()
    print(
        f"\nfrozen server: /readyz {readyz_first:.2f} s then {readyz_again:.2f} s, /healthz "
        f"{healthz:.2f} s, /metrics {metrics:.2f} s; SIGTERM to exit {exit_seconds:.2f} s "
        f"({threads} threads at SIGTERM)"
    )
    assert readyz_first < 5 + 1.5
    assert readyz_again < 1
    assert healthz < 1
    assert metrics < 5 + 2 * 1 + 1 + 1.5  # OPS_HTTP_DEADLINE + the exporter's own deadline
    assert code == 0 and exit_seconds < 10, log
    assert "stopping on SIGTERM" in log and "stopped" in log and "Traceback" not in log


FROZEN_CANCEL = """
import signal, sys, psycopg2
from ops.daemon import FreezeWatchdog
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # as ops serve does: a Python handler
connection = psycopg2.connect(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()  # the server is frozen now
FreezeWatchdog(2.0).feed()
connection.cancel()  # libpq waits for the frozen server's answer, holding the GIL
print("cancel returned", flush=True)
"""


def test_the_freeze_watchdog_ends_an_interpreter_stuck_holding_the_gil(
    frozen_cluster: Cluster,
) -> None:
    """psycopg2's cancel() on a frozen server stops every thread, signal handlers included."""
    dsn = frozen_cluster.url().render_as_string(hide_password=False).replace("+psycopg2", "")
    child = subprocess.Popen(
        [sys.executable, "-c", FROZEN_CANCEL, dsn],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    try:
        assert child.stdout.readline().strip() == "connected"
        for pid in cluster_pids(frozen_cluster):
            os.kill(pid, signal.SIGSTOP)
        child.stdin.write("go\n")
        child.stdin.flush()
        started = time.monotonic()
        time.sleep(0.5)
        child.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert child.poll() is None  # the handler cannot run: the interpreter is frozen
        code = child.wait(10)
        took = time.monotonic() - started
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    stderr = child.stderr.read()
    print(f"\nfrozen interpreter ended by the watchdog {took:.2f} s after the freeze")
    assert code == 1 and 2 <= took < 4, (code, took, stderr)
    assert "Timeout" in stderr and "cancel" not in child.stdout.read()
