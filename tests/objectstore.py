"""A real S3-compatible HTTP server for the off-host tests: PyPI ``moto``'s ``moto_server``,
started as a subprocess on loopback, behind a proxy the tests can cut.

The server enforces credentials (``INITIAL_NO_AUTH_ACTION_COUNT``): the first requests, made
here, create an IAM user allowed ``s3:*`` and its access key; any other key is refused like
AWS refuses it. moto keeps objects in memory, so an outage is simulated at the proxy (the
connection refused, or a 503 answer) while the server and what it holds live on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
REGION = "us-east-1"
# IAM calls made without credentials before the server starts checking them.
_SETUP_ACTIONS = 3
_POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)
_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
    b"Content-Length: 103\r\nConnection: close\r\n\r\n"
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
    b"<Message>down</Message></Error>"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Proxy:
    """A loopback TCP proxy with three modes: ``pass``, ``refuse`` (connections closed at
    once, like a store that is down) and ``unavailable`` (every request answered 503)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = "pass"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "refuse", "unavailable")
        self.mode = mode
        if mode != "pass":
            with self._lock:  # cut what is in flight too: an upload dies mid-way
                for sock in list(self._open):
                    _close(sock)
                self._open.clear()

    def close(self) -> None:
        self._stopped = True
        self.set_mode("refuse")
        _close(self._listener)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                _close(client)
                continue
            if self.mode == "unavailable":
                threading.Thread(target=self._answer_503, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _answer_503(self, client: socket.socket) -> None:
        try:
            client.settimeout(5)
            client.recv(65536)
            client.sendall(_UNAVAILABLE)
        except OSError:
            pass
        finally:
            _close(client)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@dataclass
class ObjectStore:
    """One running moto server, reached through :attr:`proxy`."""

    process: subprocess.Popen[bytes]
    server_port: int
    proxy: Proxy
    access_key_id: str
    secret_access_key: str

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    def client(self, *, access_key_id: str | None = None, secret_access_key: str | None = None):  # type: ignore[no-untyped-def]
        """A boto3 client straight to the server (past the proxy), for the tests' own looks."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.server_port}",
            region_name=REGION,
            aws_access_key_id=access_key_id or self.access_key_id,
            aws_secret_access_key=secret_access_key or self.secret_access_key,
        )

    def new_bucket(self, create: bool = True) -> str:
        name = f"dbops-test-{uuid.uuid4().hex[:12]}"
        if create:
            self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        found: list[str] = []
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(found)

    def env(self, bucket: str, prefix: str = "dbops", **extra: str) -> dict[str, str]:
        """The ``OFFSITE_*`` and credential variables that point dbops at ``bucket``."""
        return {
            "OFFSITE_S3_URL": f"s3://{bucket}/{prefix}".rstrip("/"),
            "OFFSITE_S3_ENDPOINT_URL": self.endpoint_url,
            "OFFSITE_S3_REGION": REGION,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            **extra,
        }

    @contextmanager
    def outage(self, mode: str = "refuse") -> Iterator[None]:
        """The store unreachable (``refuse``) or failing (``unavailable``) inside the block."""
        self.proxy.set_mode(mode)
        try:
            yield
        finally:
            self.proxy.set_mode("pass")

    def stop(self) -> None:
        self.proxy.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_object_store(log: Path) -> ObjectStore:
    import boto3

    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_ACTIONS),
        "MOTO_ALLOW_NONEXISTENT_REGION": "false",
    }
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(
                    f"moto_server did not start: {log.read_text()[-2000:]}"
                ) from None
            time.sleep(0.1)
    iam = boto3.client(
        "iam",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name=REGION,
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    iam.create_user(UserName="dbops")
    iam.put_user_policy(UserName="dbops", PolicyName="s3", PolicyDocument=_POLICY)
    key = iam.create_access_key(UserName="dbops")["AccessKey"]
    return ObjectStore(
        process=process,
        server_port=port,
        proxy=Proxy(port),
        access_key_id=key["AccessKeyId"],
        secret_access_key=key["SecretAccessKey"],
    )


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    store = start_object_store(tmp_path_factory.mktemp("moto") / "moto_server.log")
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture
def bucket(object_store: ObjectStore) -> Iterator[str]:
    """A fresh bucket of this test's own; the proxy is back to ``pass`` afterwards."""
    name = object_store.new_bucket()
    try:
        yield name
    finally:
        object_store.proxy.set_mode("pass")
