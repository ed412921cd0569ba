"""A throwaway PostgreSQL cluster for tests and benchmarks.

``initdb`` and ``postgres`` refuse to run as root, so as root the cluster is created and run as
the ``postgres`` system user, in a temporary directory that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import URL

SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "300",
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",
    "track_io_timing": "on",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "log_min_messages": "warning",
}


def server_bindir() -> Path:
    """Where ``initdb``, ``pg_ctl`` and ``postgres`` live (``pg_config --bindir``, else newest)."""
    candidates: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    )
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise RuntimeError(
        "no PostgreSQL server binaries (initdb) found; install postgresql or set DATABASE_URL"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """``initdb`` + ``pg_ctl start`` on a free loopback port; :meth:`stop` removes everything."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.bindir = server_bindir()
        self.settings = {**SERVER_SETTINGS, **(settings or {})}
        self.password = secrets.token_urlsafe(18)
        self.superuser = "postgres"
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="dbops-pg-"))
        self.datadir = self.root / "data"
        self.socketdir = self.root / "sock"
        self.logfile = self.root / "server.log"
        self._user = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self.root.chmod(0o755)

    def _run(self, args: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._user is not None:
            command = ["runuser", "-u", self._user.pw_name, "--", *command]
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            command, check=True, capture_output=True, text=True, **kwargs
        )

    def start(self) -> Cluster:
        """initdb and start; on failure everything made so far is removed, and the error says
        what the server logged."""
        try:
            self._initdb_and_start()
        except subprocess.CalledProcessError as error:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            self.stop()
            raise RuntimeError(
                f"test cluster failed: {' '.join(map(str, error.cmd))}: {error.stderr}{log}"
            ) from error
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb_and_start(self) -> None:
        pwfile = self.root / "pwfile"
        with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
            handle.write(self.password + "\n")
        if self._user is not None:
            os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
            self._run(["mkdir", "-p", str(self.socketdir)])
        else:
            self.socketdir.mkdir()
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                self.superuser,
                "--pwfile",
                str(pwfile),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        options += f" -p {self.port} -k {self.socketdir}"
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ]
        )

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args])

    def restart(self) -> None:
        self.pg_ctl("-w", "-m", "fast", "-t", "60", "restart")

    def stop_server(self, mode: str = "fast") -> None:
        self.pg_ctl("-w", "-m", mode, "-t", "60", "stop")

    def start_server(self) -> None:
        options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        options += f" -p {self.port} -k {self.socketdir}"
        self.pg_ctl("-l", str(self.logfile), "-o", options, "-w", "-t", "60", "start")

    def url(
        self, database: str = "postgres", user: str | None = None, password: str | None = None
    ) -> URL:
        return URL.create(
            "postgresql+psycopg2",
            username=user or self.superuser,
            password=password if user else self.password,
            host="127.0.0.1",
            port=self.port,
            database=database,
        )

    def stop(self) -> None:
        try:
            if (self.datadir / "postmaster.pid").exists():
                self.stop_server("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def wait_for(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until it is truthy or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(predicate())  # type: ignore[operator]
