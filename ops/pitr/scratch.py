"""A restored data directory started as a throwaway server: loopback only, its socket in a
private directory, archiving off, no hot standby, stopped and removed afterwards.

``postgres`` refuses to run as root: as root the directory is handed to the ``postgres``
system user and the server runs as that user; otherwise it runs as ourselves (the sidecar's
user in the image), which already owns what ``barman recover`` wrote.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool


class ScratchError(Exception):
    """The scratch server did not start or answer; the message says what it logged."""


def server_bindir(configured: Path | None) -> Path:
    """Where ``postgres`` and ``pg_ctl`` are: PG_BINDIR, else ``pg_config``, else newest."""
    candidates = [str(configured)] if configured else []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    )
    for candidate in candidates:
        if candidate and (Path(candidate) / "postgres").is_file():
            return Path(candidate)
    raise ScratchError("no PostgreSQL server binaries (postgres, pg_ctl) found; set PG_BINDIR")


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# What the server logs as FATAL when it turns a client away while starting or stopping: a
# connection of wait_promoted's, not the reason the server stopped.
_REFUSED_CONNECTION = (
    "the database system is not accepting connections",
    "the database system is starting up",
    "the database system is shutting down",
)


class ScratchServer:
    def __init__(self, datadir: Path, bindir: Path) -> None:
        self.datadir = datadir
        self.bindir = bindir
        self.root = datadir.parent
        self.socketdir = self.root / "sock"
        self.logfile = self.root / "server.log"
        self.hba_file = self.root / "pg_hba.conf"
        self.port = free_loopback_port()
        self.user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None

    def _command(self, args: list[str]) -> list[str]:
        if self.user is None:
            return args
        return ["runuser", "-u", self.user.pw_name, "--", *args]

    def _hand_over(self) -> None:
        """As root, give the server's user everything it must write or read."""
        if self.user is None:
            return
        uid, gid = self.user.pw_uid, self.user.pw_gid
        os.chown(self.root, uid, gid)
        for directory, dirs, files in os.walk(self.root):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(directory, name), uid, gid)
            os.lchown(directory, uid, gid)

    def start(self, timeout: float) -> None:
        self.socketdir.mkdir(mode=0o700, exist_ok=True)
        # Only local connections from this user: the socket's directory is private anyway.
        self.hba_file.write_text("local all all trust\n")
        (self.datadir / "postmaster.pid").unlink(missing_ok=True)
        self.datadir.chmod(0o700)
        self._hand_over()
        options = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.socketdir),
            "hba_file": str(self.hba_file),
            "archive_mode": "off",
            "hot_standby": "off",
            "shared_preload_libraries": "''",
        }
        option_text = " ".join(f"-c {k}={v}" for k, v in options.items())
        result = subprocess.run(
            self._command(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.logfile),
                    "-o",
                    option_text,
                    "-w",
                    "-t",
                    str(int(timeout)),
                    "start",
                ]
            ),
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout + 30,
        )
        if result.returncode != 0:
            raise ScratchError(f"the restored server did not start: {self.last_log_line()}")

    def last_log_line(self) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return "no server log"
        for line in reversed(lines):
            if "FATAL" in line or "PANIC" in line or "ERROR" in line:
                if any(answer in line for answer in _REFUSED_CONNECTION):
                    continue  # our own polling, refused while the server stopped: not why
                return line.strip()
        return lines[-1].strip() if lines else "no server log"

    def engine(self, user: str, database: str) -> Engine:
        url = URL.create(
            "postgresql+psycopg2",
            username=user,
            database=database,
            query={"host": str(self.socketdir), "port": str(self.port)},
        )
        return create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})

    def wait_promoted(self, user: str, database: str, timeout: float) -> None:
        """Until recovery reached its target and the server accepts writes."""
        engine = self.engine(user, database)
        deadline = time.monotonic() + timeout
        last = "no answer"
        try:
            while time.monotonic() < deadline:
                if not (self.datadir / "postmaster.pid").exists():
                    # It stopped (recovery ended short of its target, a WAL file the archive
                    # could not give): no point waiting out the timeout.
                    raise ScratchError(f"the restored server stopped: {self.last_log_line()}")
                try:
                    with engine.connect() as connection:
                        if not connection.execute(text("SELECT pg_is_in_recovery()")).scalar():
                            return
                        last = "still in recovery"
                except SQLAlchemyError as error:
                    last = str(getattr(error, "orig", error)).strip().splitlines()[0]
                time.sleep(0.2)
        finally:
            engine.dispose()
        raise ScratchError(f"not promoted within {timeout:g}s ({last}): {self.last_log_line()}")

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            subprocess.run(
                self._command(
                    [
                        str(self.bindir / "pg_ctl"),
                        "-D",
                        str(self.datadir),
                        "-m",
                        "immediate",
                        "-w",
                        "-t",
                        "60",
                        "stop",
                    ]
                ),
                capture_output=True,
                check=False,
                timeout=90,
            )
