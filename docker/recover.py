"""``make recover [TIME=...]``: recover the stack's live database to a point in time.

Standard library only, like stack.py. Nothing is destroyed: the data volume's contents are
copied into a new volume named in the output before anything is changed, and the output says
how to go back. The steps:

1. check the target against the recovery window while everything still runs (a bad target
   changes nothing), and for the latest point push the current WAL into the archive;
2. stop what uses the database, then PostgreSQL;
3. copy the data volume into ``<project>_pgdata_before_recover_<UTC stamp>`` and compare;
4. empty the data volume, restore the base backup and WAL into it (``ops pitr restore``, as
   the sidecar's user), then hand it to the PostgreSQL image's own ``postgres`` user;
5. start PostgreSQL, wait until it has replayed to the target and promoted, start the rest,
   and print the recovered point and row counts. The sidecar then streams the new timeline and
   takes a fresh base backup by itself.
"""

from __future__ import annotations

import subprocess
import time
from datetime import UTC, datetime
from typing import Any

PROMOTE_TIMEOUT = 1800.0  # seconds PostgreSQL may take to replay WAL up to the target
DATA_MOUNT = "/var/lib/postgresql/data"


def docker(*args: str) -> str:
    from stack import StackError

    result = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout or "no output").strip().splitlines()
        raise StackError(f"`docker {' '.join(args[:2])} ...` failed: {lines[-1]}")
    return result.stdout


def image_of(stack: Any, service: str) -> str:
    """The image a service runs, with the same overrides compose applies."""
    if service == "postgres":
        return str(stack.setting("POSTGRES_IMAGE", "postgres:17"))
    return str(stack.setting("DBOPS_IMAGE", "dbops:local"))


def psql(stack: Any, sql: str) -> str:
    script = 'exec psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" -Atc "$1"'
    result = subprocess.run(
        stack.compose("exec", "-T", "postgres", "sh", "-c", script, "psql", sql),
        capture_output=True,
        text=True,
        check=False,
        env=stack.compose_environ(),
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def ops(stack: Any, *args: str, run: bool = False, volumes: tuple[str, ...] = ()) -> int:
    """``ops ARGS`` in the running sidecar (exec), or in a one-off container (run)."""
    if run:
        extra = [item for volume in volumes for item in ("-v", volume)]
        command = stack.compose("run", "--rm", "--no-deps", "-T", *extra, "ops", *args)
    else:
        command = stack.compose("exec", "-T", "ops", "ops", *args)
    return subprocess.call(command, env=stack.compose_environ())  # the project's image tag


def kept_volume_name(stack: Any) -> str:
    """``<project>_pgdata_before_recover_<UTC stamp>``: where the data a recovery replaces goes."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stack.project}_pgdata_before_recover_{stamp.lower()}"


def keep_data(stack: Any, volume: str, kept: str) -> None:
    """Copy ``volume`` into a new volume ``kept`` and check the copy."""
    # Labelled as the project's, so `make down` leaves it and it is listed with the others.
    docker("volume", "create", "--label", f"dbops.recovered-from={volume}",
           "--label", f"com.docker.compose.project={stack.project}", kept)  # fmt: skip
    # Same entries and the same bytes in files (directories' own sizes may differ).
    same = (
        "cp -a /from/. /to/ && sum() { find \"$1\" -type f -printf '%s\\n' | "
        "awk '{ n += 1; b += $1 } END { print n, b }'; } && "
        '[ "$(find /from | wc -l)" = "$(find /to | wc -l)" ] && [ "$(sum /from)" = "$(sum /to)" ]'
    )
    docker("run", "--rm", "--user", "root", "--entrypoint", "sh", "-v", f"{volume}:/from:ro",
           "-v", f"{kept}:/to", image_of(stack, "postgres"), "-c", same)  # fmt: skip


def empty_for_restore(stack: Any, volume: str) -> None:
    """Empty the data volume and give it to the sidecar's user, who restores into it."""
    docker("run", "--rm", "--user", "root", "--entrypoint", "sh", "-v", f"{volume}:/data",
           image_of(stack, "ops"), "-c",
           "find /data -mindepth 1 -delete && chown dbops:dbops /data")  # fmt: skip


def hand_to_postgres(stack: Any, volume: str) -> None:
    """The data's owner is the PostgreSQL image's own postgres user, whatever its uid there."""
    docker("run", "--rm", "--user", "root", "--entrypoint", "sh", "-v", f"{volume}:/data",
           image_of(stack, "postgres"), "-c",
           "chown -R postgres:postgres /data && chmod 700 /data")  # fmt: skip


def wait_promoted(stack: Any, back: str) -> None:
    """Wait until PostgreSQL has replayed to the target and promoted; a server that stops or
    takes too long is a StackError ending with ``back`` (where the earlier data is)."""
    from stack import StackError

    deadline = time.monotonic() + PROMOTE_TIMEOUT
    while psql(stack, "SELECT pg_is_in_recovery()") != "f":
        state = stack.containers().get("postgres")
        if state is None or state["status"] in ("exited", "dead") or int(state["restarts"]) > 0:
            stack.run_compose("stop", "postgres", check=False)
            stack.run_compose("logs", "--no-color", "--tail=30", "postgres", check=False)
            raise StackError(f"PostgreSQL stopped during recovery (its log above); {back}")
        if time.monotonic() > deadline:
            raise StackError(
                f"PostgreSQL did not promote within {PROMOTE_TIMEOUT:g}s; see `make logs "
                f"SERVICE=postgres`; {back}"
            )
        time.sleep(1)


def remove_in_data(stack: Any, name: str) -> None:
    """Remove ``name`` from the running server's data directory (staged WAL, spent)."""
    subprocess.call(stack.compose("exec", "-T", "postgres", "sh", "-c",
                                  f'rm -rf "{DATA_MOUNT}/{name}"'),
                    env=stack.compose_environ())  # fmt: skip


def cmd_recover(stack: Any, args: Any) -> int:
    from stack import StackError, say

    if getattr(args, "source", "local") == "offsite":
        from recover_offsite import recover_offsite

        return recover_offsite(stack, args)
    target = ["--target-time", args.time] if args.time else ["--target", "latest"]
    described = f"time {args.time}" if args.time else "the latest point"
    volume = f"{stack.project}_pgdata"
    kept = kept_volume_name(stack)

    say(f"recovering the database to {described}")
    # What was committed up to now must be in the archive before the window is judged.
    if ops(stack, "pitr", "switch-wal") != 0:
        if not args.time:
            raise StackError("nothing was changed: the newest WAL could not be archived (above)")
        say("the newest WAL could not be archived (above); checking the target against the archive")
    if ops(stack, "pitr", "restore", "/tmp/dbops-recover-check", *target, "--dry-run") != 0:
        raise StackError("nothing was changed: the target cannot be recovered (reason above)")

    say("stopping what uses the database, then PostgreSQL")
    monitoring = ("postgres", "db-init", "prometheus", "alertmanager", "grafana")
    users = [s for s in stack.services if s not in monitoring]
    stack.run_compose("stop", *users, "workload", profile=True)
    stack.run_compose("stop", "postgres")

    say(f"keeping the current data in volume {kept}")
    keep_data(stack, volume, kept)
    back = f"the data before the recovery is in volume {kept}: " + going_back(stack, volume, kept)

    say("restoring the base backup and WAL into the data volume")
    empty_for_restore(stack, volume)
    # At the path PostgreSQL sees it: the recovery settings barman writes name this path.
    if ops(stack, "pitr", "restore", DATA_MOUNT, *target, run=True,
           volumes=(f"{volume}:{DATA_MOUNT}",)) != 0:  # fmt: skip
        raise StackError(f"the restore failed (above); {back}")
    hand_to_postgres(stack, volume)

    say("starting PostgreSQL: it replays WAL to the target, then promotes")
    stack.run_compose("up", "-d", "--no-deps", "postgres")
    wait_promoted(stack, back)
    # barman recover stages the WAL it replays inside the data directory: not data to keep.
    remove_in_data(stack, "barman_wal")
    stack.run_compose("up", "-d", *stack.services)
    stack.wait(stack.services, float(stack.setting("STACK_WAIT_TIMEOUT", "180")))
    report(stack, described, volume, kept)
    return 0


def going_back(stack: Any, volume: str, kept: str) -> str:
    return (
        f"to go back, run `make down`, then `docker run --rm -v {kept}:/from:ro -v "
        f"{volume}:/to {image_of(stack, 'postgres')} sh -c 'find /to -mindepth 1 -delete && "
        "cp -a /from/. /to/'`, then `make up`"
    )


def report(stack: Any, described: str, volume: str, kept: str | None) -> None:
    from stack import say

    point = psql(
        stack,
        "SELECT coalesce(pg_last_xact_replay_timestamp()::text, 'no transaction replayed')"
        " || ', timeline ' || ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))"
        "::bit(32)::int",
    )
    counts = psql(
        stack,
        "SELECT string_agg(t, ', ') FROM (SELECT format('%s %s', c.relname, "
        "(xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %I.%I', "
        "n.nspname, c.relname), false, true, '')))[1]::text) AS t FROM pg_class c JOIN "
        "pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname = "
        "'public' ORDER BY c.relname) rows",
    )
    say(f"recovered to {described}: last replayed commit {point or 'unknown'}")
    say(f"rows per table: {counts or 'none'}")
    if kept is None:
        say("there was no earlier data to keep (the data volume was missing or empty)")
        return
    say(f"the data from before the recovery is kept in volume {kept}")
    say(going_back(stack, volume, kept))
