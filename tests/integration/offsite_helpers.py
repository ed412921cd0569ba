"""A test cluster whose WAL and base backups go to a real S3 server (moto) with Barman Cloud's
own tools, in Barman Cloud's standard layout for the server ``dbops``: what the sidecar's
shipping writes, made here without the sidecar so recovery is tested against the layout
itself.

WAL: ``archive_command`` runs ``barman-cloud-wal-archive`` (gzip) through a wrapper whose env
file holds the credentials (the server's environment is not ours to set). Base backups:
``barman-cloud-backup`` on the host against the cluster, credentials in its environment.
"""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
import time
from pathlib import Path

from sqlalchemy.engine import URL

from tests.integration.pitr_helpers import PITR_SERVER_SETTINGS, barman_program, execute
from tests.objectstore import ObjectStore
from tests.pgcluster import Cluster

PREFIX = "dbops"


def cloud_program(name: str, barman: Path | None = None) -> Path:
    return (barman or barman_program()).with_name(f"barman-cloud-{name}")


def cloud_args(store: ObjectStore, bucket: str) -> list[str]:
    return [
        "--cloud-provider",
        "aws-s3",
        "--endpoint-url",
        store.endpoint_url,
        "--addressing-style",
        "path",
    ]


def store_env(store: ObjectStore) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AWS_ACCESS_KEY_ID": store.access_key_id,
        "AWS_SECRET_ACCESS_KEY": store.secret_access_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def archiving_cluster(store: ObjectStore, bucket: str, workdir: Path, barman: Path) -> Cluster:
    """A cluster that archives every WAL segment to ``s3://bucket/dbops`` as it closes."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.parent.chmod(0o755)
    env_file = workdir / "archive.env"
    env_file.write_text(
        "".join(f"{k}={shlex.quote(v)}\n" for k, v in store_env(store).items() if k != "PATH")
    )
    wrapper = workdir / "archive-wal"
    args = " ".join(shlex.quote(a) for a in cloud_args(store, bucket))
    wrapper.write_text(
        "#!/bin/sh\nset -a\n. " + shlex.quote(str(env_file)) + "\nset +a\n"
        f"exec {shlex.quote(str(cloud_program('wal-archive', barman)))} {args} --gzip "
        f's3://{bucket}/{PREFIX} dbops "$1"\n'
    )
    env_file.chmod(0o600)
    wrapper.chmod(0o700)
    workdir.chmod(0o700)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (workdir, env_file, wrapper):
            os.chown(path, user.pw_uid, user.pw_gid)
    return Cluster(
        {
            **PITR_SERVER_SETTINGS,
            "archive_mode": "on",
            "archive_command": f"'{wrapper} %p'",
            "archive_timeout": "0",
        }
    ).start()


def cloud_backup(store: ObjectStore, bucket: str, cluster: Cluster) -> None:
    """``barman-cloud-backup`` of ``cluster`` to the store (gzip), as root reads its data."""
    env = {
        **store_env(store),
        "PGHOST": "127.0.0.1",
        "PGPORT": str(cluster.port),
        "PGUSER": cluster.superuser,
        "PGPASSWORD": cluster.password,
    }
    result = subprocess.run(
        [
            str(cloud_program("backup")),
            *cloud_args(store, bucket),
            "--gzip",
            f"s3://{bucket}/{PREFIX}",
            "dbops",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def switch_and_ship(store: ObjectStore, bucket: str, url: URL, timeout: float = 60.0) -> str:
    """Close the current WAL segment and wait until it is in the store; its name."""
    name = execute(url, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(key.endswith(f"/{name}.gz") for key in store.keys(bucket, f"{PREFIX}/dbops/wals/")):
            return str(name)
        time.sleep(0.2)
    raise AssertionError(f"WAL {name} did not reach the store within {timeout:g}s")


def server_reachable_barman(root: Path) -> Path:
    """Barman's programs as the restored server's user can run them, for ``restore_command``.

    As root the restored server runs as ``postgres``, which cannot enter a virtualenv whose
    interpreter lives under ``/root`` (pyenv). Then the same Barman package is run by the
    system's Python 3.11 through scripts of the same names in ``root``; otherwise the real
    programs are used as they are.
    """
    real = barman_program()
    if os.geteuid() != 0:
        return real
    site = next((real.parent.parent / "lib").glob("python3*/site-packages"))
    bindir = root / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for script in real.parent.glob("barman*"):
        body = script.read_text().splitlines()[1:]  # the original, without its shebang
        (bindir / script.name).write_text(
            "#!/usr/bin/python3.11\nimport sys\n"
            f"sys.path.insert(0, {str(site)!r})\n" + "\n".join(body) + "\n"
        )
        (bindir / script.name).chmod(0o755)
    for path in (root, bindir):
        path.chmod(0o755)
    return bindir / "barman"
