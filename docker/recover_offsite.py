"""``make recover FROM=offsite [TIME=...]``: recover the database from the object store alone.

For the day the host's volumes are gone (or a fresh machine with the repository, ``.env`` and
the store's credentials): nothing is read from the local Barman archive or PITR_DIR. Standard
library only, like stack.py. The steps:

1. check the target against what the store holds, in a one-off sidecar container (a bad
   target, bad credentials or an empty store change nothing);
2. stop what uses the database, then PostgreSQL (whatever of it still runs);
3. keep the data volume's contents, if it has any, in ``<project>_pgdata_before_recover_<UTC>``;
4. empty the data volume and restore into it in a one-off sidecar container: the base backup
   with barman-cloud-restore, and the WAL up to the store's end staged beside it with
   barman-cloud-wal-restore (``ops pitr restore --from offsite --wal stage``). The official
   postgres image has no Barman Cloud: staged WAL lets its ``restore_command`` be a plain
   ``cp``, so the server needs neither the store's credentials nor a way to reach it;
5. hand the directory to the PostgreSQL image's own ``postgres`` user, start PostgreSQL, wait
   until it has replayed to the target and promoted, drop the staged WAL, start the rest, and
   print the recovered point and row counts. The sidecar then streams the new timeline, takes
   a fresh base backup, and ships both to the store.
"""

from __future__ import annotations

import subprocess
from typing import Any

from recover import (
    DATA_MOUNT,
    docker,
    empty_for_restore,
    going_back,
    hand_to_postgres,
    image_of,
    keep_data,
    kept_volume_name,
    ops,
    psql,
    remove_in_data,
    report,
    wait_promoted,
)

STAGED_WAL = "dbops_offsite_wal"  # ops.offsite.recovery.STAGED_WAL
RECOVERY_SETTINGS = (
    "restore_command",
    "recovery_target_timeline",
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_action",
)


def volume_exists(name: str) -> bool:
    return (
        subprocess.run(
            ["docker", "volume", "inspect", name], capture_output=True, check=False
        ).returncode
        == 0
    )


def volume_has_data(name: str, image: str) -> bool:
    result = subprocess.run(
        ["docker", "run", "--rm", "--user", "root", "--entrypoint", "sh", "-v", f"{name}:/v:ro",
         image, "-c", 'test -n "$(ls -A /v)"'],
        capture_output=True, check=False,
    )  # fmt: skip
    return result.returncode == 0


def recover_offsite(stack: Any, args: Any) -> int:
    from stack import OBJECTSTORE, StackError, say

    target = ["--target-time", args.time] if args.time else ["--target", "latest"]
    described = f"time {args.time}" if args.time else "the latest point in the object store"
    project = stack.project
    volume = f"{project}_pgdata"
    kept = kept_volume_name(stack)
    postgres_image = image_of(stack, "postgres")
    ops_image = image_of(stack, "ops")

    say(f"recovering the database from the object store to {described}")
    if subprocess.run(["docker", "image", "inspect", ops_image], capture_output=True).returncode:
        stack.run_compose("build", "ops")  # a fresh machine: nothing built yet
    if stack.objectstore and stack.containers().get(OBJECTSTORE) is None:
        raise StackError(
            "the objectstore service is not running: its objects lived in its memory, so there "
            "is nothing to recover from (COMPOSE_PROFILES=objectstore is a demo target)"
        )
    check = ops(stack, "pitr", "restore", "/tmp/dbops-recover-check", "--from", "offsite",
                *target, "--dry-run", run=True)  # fmt: skip
    if check != 0:
        raise StackError("nothing was changed: the target cannot be recovered (reason above)")

    say("stopping what uses the database, then PostgreSQL")
    keep_running = ("postgres", "db-init", "prometheus", "alertmanager", "grafana", OBJECTSTORE)
    users = [s for s in stack.services if s not in keep_running]
    stack.run_compose("stop", *users, "workload", profile=True)
    stack.run_compose("stop", "postgres")

    had_data = volume_exists(volume) and volume_has_data(volume, postgres_image)
    if had_data:
        say(f"keeping the current data in volume {kept}")
        keep_data(stack, volume, kept)
        back = going_back(stack, volume, kept)
    else:
        say(f"volume {volume} is missing or empty: nothing to keep")
        back = "no earlier data was kept"
        if not volume_exists(volume):
            # As compose would create it, so compose keeps using (and `make down` keeps) it.
            docker("volume", "create", "--label", f"com.docker.compose.project={project}",
                   "--label", "com.docker.compose.volume=pgdata", volume)  # fmt: skip

    say("restoring the base backup and staging its WAL from the object store")
    empty_for_restore(stack, volume)
    if ops(stack, "pitr", "restore", DATA_MOUNT, "--from", "offsite", "--wal", "stage", *target,
           run=True, volumes=(f"{volume}:{DATA_MOUNT}",)) != 0:  # fmt: skip
        raise StackError(f"the restore from the object store failed (above); {back}")
    hand_to_postgres(stack, volume)

    say("starting PostgreSQL: it replays the staged WAL to the target, then promotes")
    stack.run_compose("up", "-d", "--no-deps", "postgres")
    wait_promoted(stack, back)
    remove_in_data(stack, STAGED_WAL)
    # The recovery settings are spent: out of postgresql.auto.conf, so the next base backup
    # does not carry them into a later recovery.
    for name in RECOVERY_SETTINGS:
        psql(stack, f"ALTER SYSTEM RESET {name}")
    psql(stack, "SELECT pg_reload_conf()")
    stack.run_compose("up", "-d", *stack.services)
    stack.wait(stack.services, float(stack.setting("STACK_WAIT_TIMEOUT", "180")))
    report(stack, described, volume, kept if had_data else None)
    return 0
