#!/usr/bin/env python3
"""The operator commands behind the Makefile: up, down, ps, logs, backup, backups, verify, restore,
psql, demo, demo-stop.

Standard library only, so it runs with any Python 3.9+ before the project's virtualenv exists.
``recover`` is in recover.py. ``up`` does what an operator would do by hand and no more: make sure a Docker engine answers,
create ``.env`` with generated secrets on the first run, build the project's image, start the
services, then wait until each is healthy (or, for the one-shot init job, completed) and print
where everything is. It is bounded: a service that never gets there is reported with its logs.

Environment (or ``.env``): ``COMPOSE_PROJECT_NAME`` (default ``dbops``), ``STACK_ENV_FILE``
(default ``.env``), ``STACK_WITHOUT`` (services to leave out, comma-separated),
``STACK_WAIT_TIMEOUT`` (seconds, default 180), ``STACK_COMPOSE_FILES`` (extra compose files,
colon-separated), ``POSTGRES_PUBLISH_PORT`` (publish PostgreSQL on the host), ``COMPOSE``
(the compose command, when auto-detection is not wanted), ``DBOPS_IMAGE`` (the image tag; by
default one per project name, so two checkouts on one machine never replace each other's build).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / ".env.example"
# The services `make up` starts (the workload is the "demo" profile's, started by `make demo`).
CORE_SERVICES = ("postgres", "db-init", "ops", "prometheus", "alertmanager", "grafana")
ONE_SHOT = {"db-init"}
SECRETS = (
    "POSTGRES_PASSWORD",
    "APP_DB_PASSWORD",
    "MONITOR_DB_PASSWORD",
    "BACKUP_DB_PASSWORD",
    "ADMIN_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
    "OBJECTSTORE_TOKEN",
    "OPS_ALERTS_TOKEN",
)
# needed only when that service runs
SECRET_OWNER = {"GRAFANA_ADMIN_PASSWORD": "grafana", "OBJECTSTORE_TOKEN": "objectstore"}
# The demo S3 server of the "objectstore" profile and what OFFSITE_* say when they point at it.
OBJECTSTORE = "objectstore"
OBJECTSTORE_BUCKET = "dbops-offsite"
OBJECTSTORE_SETTINGS = {
    "OFFSITE_S3_URL": f"s3://{OBJECTSTORE_BUCKET}/dbops",
    "OFFSITE_S3_ENDPOINT_URL": "http://objectstore:5000",
    "OFFSITE_S3_REGION": "us-east-1",
    # the demo target only: a real store's bucket is never created unless asked
    "OFFSITE_CREATE_BUCKET": "true",
    "AWS_ACCESS_KEY_ID": "dbops",
}
# Headline queries of the dashboards, printed as Prometheus graph links when Grafana is left out.
HEADLINE_QUERIES = (
    ("pool utilisation", "pool:dbops_pool_utilisation:ratio"),
    ("server connections", "instance:dbops_pg_connections:saturation_ratio"),
    ("transactions/s", "datname:dbops_pg_transactions:rate5m"),
    ("query p95", "pool_operation:dbops_query_duration_seconds:p95_5m"),
    ("backup age", "instance:dbops_backup_age_seconds"),
    ("database size", "dbops_pg_database_size_bytes"),
)
# Secrets added after the first release: an older .env without them gets one appended.
ADDED_SECRETS = ("OPS_ALERTS_TOKEN", "OBJECTSTORE_TOKEN")
URL_SAFE = re.compile(r"^[A-Za-z0-9._~-]+$")
EXIT_FAILED, EXIT_USAGE = 1, 2


class StackError(Exception):
    """A problem the operator has to fix; the message says what and how."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def say(message: str) -> None:
    print(f"stack: {message}", flush=True)


# --- configuration ---------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose reads them (comments and blank lines skipped, quotes removed)."""
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def create_env_file(path: Path, skip: frozenset[str] = frozenset()) -> list[str]:
    """Copy .env.example to ``path``, filling every empty secret but those in ``skip``; returns
    the names generated."""
    generated: list[str] = []
    lines = []
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Z0-9_]+_(?:PASSWORD|TOKEN))=\s*$", line)
        if match and match.group(1) not in skip:
            # URL-safe, so every password can also be written into a connection URL
            line = f"{match.group(1)}={secrets.token_urlsafe(24)}"
            generated.append(match.group(1))
        lines.append(line)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return generated


def add_missing_secrets(path: Path, environ: dict[str, str]) -> list[str]:
    """Append a generated value for each of ``ADDED_SECRETS`` that neither the file nor the
    environment mentions (an .env from before they existed); existing lines are left alone."""
    present = read_env_file(path)
    missing = [n for n in ADDED_SECRETS if n not in present and not environ.get(n)]
    if missing:
        text = path.read_text(encoding="utf-8")
        lines = [f"{name}={secrets.token_urlsafe(24)}" for name in missing]
        with path.open("a", encoding="utf-8") as handle:
            handle.write(("" if text.endswith("\n") or not text else "\n") + "\n".join(lines) + "\n")
    return missing


class Stack:
    """Settings from the environment and the env file, and the compose command they imply."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.env_file = Path(self.environ.get("STACK_ENV_FILE") or ROOT / ".env")
        if not self.env_file.is_absolute():
            self.env_file = ROOT / self.env_file

    def setting(self, name: str, default: str = "") -> str:
        """The shell's value wins over the env file's, as in compose's own interpolation."""
        value = self.environ.get(name)
        if value:
            return value
        return read_env_file(self.env_file).get(name) or default

    @property
    def project(self) -> str:
        return self.setting("COMPOSE_PROJECT_NAME", "dbops")

    @property
    def without(self) -> set[str]:
        return {s.strip() for s in self.setting("STACK_WITHOUT").split(",") if s.strip()}

    @property
    def profiles(self) -> set[str]:
        """COMPOSE_PROFILES (shell or env file), as compose reads it."""
        return {p.strip() for p in self.setting("COMPOSE_PROFILES").split(",") if p.strip()}

    @property
    def objectstore(self) -> bool:
        """The demo S3 server runs, and OFFSITE_* point at it unless they name a store."""
        return OBJECTSTORE in self.profiles and OBJECTSTORE not in self.without

    @property
    def services(self) -> list[str]:
        extra = [OBJECTSTORE] if self.objectstore else []
        return extra + [s for s in CORE_SERVICES if s not in self.without]

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secrets the chosen services need: Grafana's only when Grafana runs."""
        return tuple(
            name for name in SECRETS if SECRET_OWNER.get(name, "") in ("", *self.services)
        )

    @property
    def image(self) -> str:
        """The project's image tag. One per compose project, so that a second checkout's build
        (another COMPOSE_PROJECT_NAME) never replaces the image the first one runs."""
        explicit = self.setting("DBOPS_IMAGE")
        if explicit:
            return explicit
        return "dbops:local" if self.project == "dbops" else f"dbops-{self.project}:local"

    def compose_files(self) -> list[Path]:
        files = [ROOT / "docker-compose.yml"]
        if self.setting("POSTGRES_PUBLISH_PORT"):
            files.append(ROOT / "docker" / "compose.postgres-port.yml")
        for extra in self.setting("STACK_COMPOSE_FILES").split(":"):
            if extra.strip():
                path = Path(extra.strip())
                files.append(path if path.is_absolute() else ROOT / path)
        return files

    def compose_command(self) -> list[str]:
        if self.environ.get("COMPOSE"):
            return shlex.split(self.environ["COMPOSE"])
        if shutil.which("docker") and run_quiet(["docker", "compose", "version"]):
            return ["docker", "compose"]
        if shutil.which("docker-compose"):
            return ["docker-compose"]
        raise StackError(
            "neither `docker compose` (v2) nor `docker-compose` (1.29+) is installed; "
            "install one of them (Debian: apt-get install docker-compose)"
        )

    def compose(self, *args: str, profile: bool = False) -> list[str]:
        command = [*self.compose_command(), "--project-name", self.project]
        command += ["--project-directory", str(ROOT), "--env-file", str(self.env_file)]
        for path in self.compose_files():
            command += ["-f", str(path)]
        # A --profile on the command line replaces COMPOSE_PROFILES: name those too, so that
        # `down` also stops the objectstore.
        for name in sorted(self.profiles | ({"demo"} if profile else set())):
            command += ["--profile", name]
        return [*command, *args]

    def compose_environ(self) -> dict[str, str]:
        env = {**self.environ, "DBOPS_IMAGE": self.image}
        if self.objectstore and not self.setting("OFFSITE_S3_URL"):
            # Through the environment, never argv: compose interpolates it into the sidecar's.
            env.update(OBJECTSTORE_SETTINGS)
            env["AWS_SECRET_ACCESS_KEY"] = self.setting("OBJECTSTORE_TOKEN")
            env.pop("AWS_ACCESS_KEY_ID_FILE", None)
            env.pop("AWS_SECRET_ACCESS_KEY_FILE", None)
        return env

    def start_objectstore(self, build: bool) -> None:
        """The demo S3 server first: started, healthy, its bucket there, before the sidecar
        that ships to it starts."""
        if build:
            self.run_compose("build", OBJECTSTORE)
        self.run_compose("up", "-d", OBJECTSTORE)
        self.wait([OBJECTSTORE], float(self.setting("STACK_WAIT_TIMEOUT", "180")))
        if not self.setting("OFFSITE_S3_URL"):
            self.run_compose(
                "exec", "-T", OBJECTSTORE, "python", "/usr/local/bin/objectstore-create-bucket",
                OBJECTSTORE_BUCKET,
            )  # fmt: skip
        say(
            "objectstore (profile objectstore): an in-memory demo S3 server; off-host copies "
            "go there and are lost when it restarts. Point OFFSITE_* at a durable store for "
            "real use"
        )

    def run_compose(self, *args: str, profile: bool = False, check: bool = True) -> int:
        code = subprocess.call(
            self.compose(*args, profile=profile), cwd=ROOT, env=self.compose_environ()
        )
        if check and code != 0:
            raise StackError(f"`compose {' '.join(args)}` failed (exit {code})", code)
        return code

    # --- checks ------------------------------------------------------------------------------

    def require_engine(self) -> None:
        if not shutil.which("docker"):
            raise StackError("the docker command is not installed; install Docker first")
        try:
            probe = subprocess.run(
                ["docker", "info", "--format", "{{.ServerVersion}}"],
                capture_output=True,
                text=True,
                timeout=30,
                env=self.environ,
            )
        except subprocess.TimeoutExpired:
            raise StackError("no Docker engine answered within 30 s (docker info)") from None
        if probe.returncode != 0 or not probe.stdout.strip():
            reason = (probe.stderr.strip().splitlines() or ["no answer"])[-1]
            raise StackError(
                f"no Docker engine is reachable: {reason}\n"
                "  start the Docker daemon (e.g. `systemctl start docker`) or point DOCKER_HOST "
                "at one, then retry"
            )

    def ensure_env_file(self) -> None:
        if not self.env_file.exists():
            # The objectstore's key is generated even before its profile is on: turning the
            # profile on later must not find it empty.
            skip = frozenset(SECRETS) - frozenset(self.secrets) - {"OBJECTSTORE_TOKEN"}
            generated = create_env_file(self.env_file, skip)
            say(
                f"created {self.env_file} from .env.example with generated secrets "
                f"({', '.join(generated)}); keep it private, it is the only copy. "
                "ADMIN_PASSWORD there is the platform admin's login"
            )
        added = add_missing_secrets(self.env_file, self.environ)
        if added:
            say(f"added generated {', '.join(added)} to {self.env_file}")
        problems = []
        for name in self.secrets:
            value = self.setting(name)
            if not value:
                problems.append(f"{name} is empty: set it in {self.env_file} (no default exists)")
            elif name == "MONITOR_DB_PASSWORD" and not URL_SAFE.match(value):
                problems.append(
                    f"{name} must use only A-Z a-z 0-9 . _ ~ - (it is written into a URL)"
                )
            elif name == "OPS_ALERTS_TOKEN" and not re.match(r"^[\x21-\x7e]{16,4096}$", value):
                problems.append(f"{name} must be 16 or more visible ASCII characters, no spaces")
            elif name != "GRAFANA_ADMIN_PASSWORD" and len(value) < 12:
                # what `ops db init` demands of the admin's and the roles' passwords
                problems.append(f"{name} must be at least 12 characters")
        if problems:
            raise StackError("refusing to start:\n  " + "\n  ".join(problems), EXIT_USAGE)

    # --- state -------------------------------------------------------------------------------

    def containers(self) -> dict[str, dict[str, object]]:
        """The project's service containers (not one-off `run` ones) by service name."""
        ids = subprocess.run(
            [
                "docker", "ps", "-aq",
                "--filter", f"label=com.docker.compose.project={self.project}",
                "--filter", "label=com.docker.compose.oneoff=False",
            ],
            capture_output=True, text=True, check=True, env=self.environ,
        ).stdout.split()  # fmt: skip
        if not ids:
            return {}
        inspected = json.loads(
            subprocess.run(
                ["docker", "inspect", *ids],
                capture_output=True,
                text=True,
                check=True,
                env=self.environ,
            ).stdout
        )
        found: dict[str, dict[str, object]] = {}
        for item in inspected:
            service = item["Config"]["Labels"].get("com.docker.compose.service", "?")
            state = item["State"]
            found[service] = {
                "status": state["Status"],
                "exit_code": state["ExitCode"],
                "health": (state.get("Health") or {}).get("Status"),
                "restarts": item.get("RestartCount", 0),
            }
        return found

    def wait(self, services: list[str], timeout: float) -> None:
        """Until every service is healthy/running, or completed for the one-shot ones."""
        deadline = time.monotonic() + timeout
        shown = ""
        while True:
            states = self.containers()
            pending, failed = [], []
            for service in services:
                verdict = judge(service, states.get(service))
                if verdict == "failed":
                    failed.append(service)
                elif verdict != "ok":
                    pending.append(f"{service} ({verdict})")
            if failed:
                self.report(services, failed)
                raise StackError(f"failed: {', '.join(failed)} (logs above)")
            if not pending:
                return
            line = "waiting for " + ", ".join(pending)
            if line != shown:
                say(line)
                shown = line
            if time.monotonic() > deadline:
                stuck = [p.split(" ")[0] for p in pending]
                self.report(services, stuck)
                raise StackError(f"not ready after {timeout:g} s: {', '.join(pending)}")
            time.sleep(1)

    def report(self, services: list[str], failing: list[str]) -> None:
        states = self.containers()
        print("\nservice states:", flush=True)
        for service in services:
            print(f"  {service:14} {describe(states.get(service))}", flush=True)
        for service in failing:
            print(f"\n--- last log lines of {service} ---", flush=True)
            self.run_compose("logs", "--no-color", "--tail=60", service, check=False, profile=True)

    def urls(self) -> list[tuple[str, str]]:
        host = self.setting("STACK_BIND", "127.0.0.1")
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        entries = [
            ("grafana", "Grafana", "GRAFANA_PORT", "3000", ""),
            ("prometheus", "Prometheus", "PROMETHEUS_PORT", "9090", ""),
            ("alertmanager", "Alertmanager", "ALERTMANAGER_PORT", "9093", ""),
            ("ops", "Sidecar metrics", "OPS_PORT", "9188", "/metrics"),
            ("ops", "Sidecar health", "OPS_PORT", "9188", "/healthz"),
        ]
        return [
            (label, f"http://{host}:{self.setting(port, default)}{path}")
            for service, label, port, default, path in entries
            if service in self.services
        ]


    def graph_links(self) -> list[tuple[str, str]]:
        base = dict(self.urls()).get("Prometheus")
        if base is None:
            return []
        return [
            (label, f"{base}/graph?" + urllib.parse.urlencode({"g0.expr": expr, "g0.tab": "0"}))
            for label, expr in HEADLINE_QUERIES
        ]


def judge(service: str, state: dict[str, object] | None) -> str:
    """ok, failed, or what the service is still doing."""
    if state is None:
        return "not created"
    status, health = state["status"], state["health"]
    if service in ONE_SHOT:
        if status == "exited":
            return "ok" if state["exit_code"] == 0 else "failed"
        return str(status)
    if status in ("exited", "dead") or int(str(state["restarts"])) > 2:
        return "failed"  # stopped, or restarted over and over: it will not get better alone
    if status != "running":
        return str(status)
    if health in (None, "healthy"):
        return "ok"
    return str(health)


def describe(state: dict[str, object] | None) -> str:
    if state is None:
        return "no container"
    text = str(state["status"])
    if state["status"] == "exited":
        text += f" (exit {state['exit_code']})"
    if state["health"]:
        text += f", {state['health']}"
    return text


def run_quiet(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# --- commands --------------------------------------------------------------------------------


def cmd_up(stack: Stack, args: argparse.Namespace) -> int:
    started = time.monotonic()
    stack.require_engine()
    stack.ensure_env_file()
    if not args.no_build:
        # db-init, ops and the workload share one image; building it once is enough.
        stack.run_compose("build", "ops")
    if stack.objectstore:
        stack.start_objectstore(build=not args.no_build)
    built = time.monotonic()
    services = stack.services
    code = stack.run_compose("up", "-d", "--remove-orphans", *services, check=False)
    if code != 0:
        stack.report(services, [s for s in services if s != "postgres"])
        raise StackError(f"`compose up` failed (exit {code}); service logs above")
    stack.wait(services, float(stack.setting("STACK_WAIT_TIMEOUT", "180")))
    ready = time.monotonic()
    say(
        f"every service is healthy or completed: {ready - built:.1f} s from start "
        f"({ready - started:.1f} s including the build)"
    )
    for label, url in stack.urls():
        print(f"  {label:16} {url}")
    if "grafana" in services:
        print(f"  Grafana login: {stack.setting('GRAFANA_ADMIN_USER', 'admin')}, password in .env")
    elif "prometheus" in services:
        print("  Without Grafana, the dashboards' headline graphs in Prometheus:")
        for label, url in stack.graph_links():
            print(f"    {label:20} {url}")
    print(
        "  The platform admin's password is ADMIN_PASSWORD in .env. In the first minute, "
        "DbopsWalStreamingDown and DbopsBaseBackupStale may be pending while streaming and "
        "the first base backup start; they clear by themselves."
    )
    return 0


def cmd_demo(stack: Stack, args: argparse.Namespace) -> int:
    cmd_up(stack, args)
    stack.run_compose("up", "-d", "--no-deps", "workload", profile=True)
    stack.wait(["workload"], float(stack.setting("STACK_WAIT_TIMEOUT", "180")))
    mode = stack.setting("WORKLOAD_MODE", "steady")
    port = stack.setting("WORKLOAD_PORT", "9189")
    say(f"demo workload running ({mode}); its pool metrics: http://127.0.0.1:{port}/metrics")
    return 0


def cmd_demo_stop(stack: Stack, args: argparse.Namespace) -> int:
    """The workload alone: the stack keeps running, and its pool's series go stale."""
    stack.run_compose("stop", "workload", profile=True)
    stack.run_compose("rm", "-f", "workload", profile=True)
    say("demo workload stopped; the rest of the stack runs on")
    return 0


def cmd_down(stack: Stack, args: argparse.Namespace) -> int:
    extra = ["--volumes"] if args.volumes else []
    stack.run_compose("down", "--remove-orphans", *extra, profile=True)
    return 0


def cmd_ps(stack: Stack, args: argparse.Namespace) -> int:
    return stack.run_compose("ps", "--all", profile=True, check=False)


def cmd_logs(stack: Stack, args: argparse.Namespace) -> int:
    follow = ["--follow"] if args.follow else []
    if not sys.stdout.isatty():
        follow.append("--no-color")
    return stack.run_compose(
        "logs", *follow, "--tail=200", *args.services, profile=True, check=False
    )


def exec_args() -> list[str]:
    return [] if sys.stdin.isatty() and sys.stdout.isatty() else ["-T"]


def ops_in_sidecar(stack: Stack, *command: str) -> int:
    """``ops COMMAND`` in the sidecar, where the stack's backups and settings are. Its messages
    name make's variables (FORCE=1, ID=…) rather than ops's options, since make is what was
    typed."""
    return stack.run_compose(
        "exec", *exec_args(), "-e", "OPS_HINTS=make", "ops", "ops", *command, check=False
    )


def cmd_backup(stack: Stack, args: argparse.Namespace) -> int:
    return ops_in_sidecar(stack, "backup", "run")


def source_args(value: str, offsite: list[str]) -> list[str]:
    """``FROM=`` as ops's option: nothing for local, ``offsite`` for the off-host store."""
    if value in ("", "local"):
        return []
    if value == "offsite":
        return offsite
    raise StackError(f"FROM={value}: must be local or offsite", EXIT_USAGE)


def cmd_backups(stack: Stack, args: argparse.Namespace) -> int:
    where = source_args(args.source, ["--offsite"])
    return ops_in_sidecar(stack, "backup", "list", *where, *(["--all"] if args.all else []))


def cmd_verify(stack: Stack, args: argparse.Namespace) -> int:
    drill = ["--drill"] if args.drill else []
    return ops_in_sidecar(stack, "backup", "verify", *drill, *(["--", args.id] if args.id else []))


def restore_target(stack: Stack, backup_id: str) -> str:
    """The default database a stack restore creates: <POSTGRES_DB>_restore_<id>."""
    return "{}_restore_{}".format(
        stack.setting("POSTGRES_DB", "dbops"), re.sub(r"[^a-z0-9]+", "_", backup_id.lower())
    )


def restore_compose_args(stack: Stack, args: argparse.Namespace) -> list[str]:
    """The compose arguments of a restore; the name and id go to ``ops`` as data, never options.

    An ordinary restore runs in the sidecar as the backup role, which may create databases.
    Replacing the live database runs as its owner (db-init's role) in a one-off db-init
    container: the backup role can neither rename the live database nor end its sessions.
    """
    target = args.target_db or restore_target(stack, args.id)
    command = ["backup", "restore", f"--target-db={target}"]
    command += ["--force"] if args.force else []
    command += ["--replace-live"] if args.replace_live else []
    command += ["--allow-postgres-db"] if args.allow_postgres_db else []
    command += source_args(args.source, ["--from=offsite"])
    command += ["--", args.id]
    hints = ["-e", "OPS_HINTS=make"]  # messages name FORCE=1, not --force
    if args.replace_live:
        return ["run", "--rm", "--no-deps", *exec_args(), *hints, "db-init", *command]
    return ["exec", *exec_args(), *hints, "ops", "ops", *command]


def cmd_restore(stack: Stack, args: argparse.Namespace) -> int:
    return stack.run_compose(*restore_compose_args(stack, args), check=False)


def cmd_psql(stack: Stack, args: argparse.Namespace) -> int:
    # Inside the container, over its local socket, as the owner: no password leaves .env.
    script = 'exec psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" "$@"'
    return stack.run_compose(
        "exec", *exec_args(), "postgres", "sh", "-c", script, "psql", *args.psql_args, check=False
    )


def cmd_recover(stack: Stack, args: argparse.Namespace) -> int:
    # recover.py (beside this file) imports `stack`: let it find this very module, so the
    # StackError it raises is the one main() catches.
    sys.modules.setdefault("stack", sys.modules[__name__])
    from recover import cmd_recover as recover

    return recover(stack, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="docker/stack.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the stack and wait until it is healthy")
    up.add_argument("--no-build", action="store_true", help="use the image as it is")
    up.set_defaults(handler=cmd_up)
    demo = commands.add_parser("demo", help="`up`, then the demo workload")
    demo.add_argument("--no-build", action="store_true")
    demo.set_defaults(handler=cmd_demo)
    down = commands.add_parser("down", help="stop and remove the containers (data stays)")
    down.add_argument("--volumes", action="store_true", help="also delete data and backups")
    down.set_defaults(handler=cmd_down)
    commands.add_parser("ps", help="the containers").set_defaults(handler=cmd_ps)
    logs = commands.add_parser("logs", help="service logs")
    logs.add_argument("--follow", "-f", action="store_true")
    logs.add_argument("services", nargs="*")
    logs.set_defaults(handler=cmd_logs)
    commands.add_parser("backup", help="run a backup now").set_defaults(handler=cmd_backup)
    backups = commands.add_parser("backups", help="list the sidecar's backups")
    backups.add_argument("--all", action="store_true", help="include failed runs")
    backups.add_argument("--from", dest="source", default="", help="offsite: the store's")
    backups.set_defaults(handler=cmd_backups)
    verify = commands.add_parser("verify", help="verify a backup (default: the newest)")
    verify.add_argument("id", nargs="?", default="")
    verify.add_argument("--drill", action="store_true", help="restore it and compare row counts")
    verify.set_defaults(handler=cmd_verify)
    stop = commands.add_parser("demo-stop", help="stop the demo workload, keep the stack")
    stop.set_defaults(handler=cmd_demo_stop)
    restore = commands.add_parser("restore", help="restore a backup into a new database")
    restore.add_argument("id")
    restore.add_argument("--target-db", default="")
    restore.add_argument("--force", action="store_true")
    restore.add_argument("--replace-live", action="store_true")
    restore.add_argument("--allow-postgres-db", action="store_true")
    restore.add_argument("--from", dest="source", default="", help="offsite: from the store")
    restore.set_defaults(handler=cmd_restore)
    recover = commands.add_parser(
        "recover", help="recover the live database to a point in time (default: the latest)"
    )
    recover.add_argument("--time", default="", help="e.g. '2026-11-28 14:05:00+00'")
    recover.add_argument(
        "--from",
        dest="source",
        choices=["local", "offsite"],
        default="local",
        help="offsite: from the object store alone (OFFSITE_*), e.g. with the host's backups gone",
    )
    recover.set_defaults(handler=cmd_recover)
    psql = commands.add_parser("psql", help="psql as the database owner (extra arguments: psql's)")
    psql.set_defaults(handler=cmd_psql)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "psql":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.psql_args = extra
    stack = Stack()
    try:
        if args.command not in ("up", "demo"):
            stack.require_engine()
        if not stack.env_file.exists() and args.command not in ("up", "demo"):
            raise StackError(f"{stack.env_file} does not exist: run `make up` first", EXIT_USAGE)
        code: int = args.handler(stack, args)
        return code
    except StackError as error:
        print(f"stack: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
