"""docker/stack.py, the logic behind `make up`: secrets on first run, refusals, compose command."""

from __future__ import annotations

import importlib.util
import stat
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_stack() -> Any:
    spec = importlib.util.spec_from_file_location("dbops_stack", ROOT / "docker" / "stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stack = load_stack()


def test_first_run_env_file_gets_private_generated_url_safe_secrets(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    generated = stack.create_env_file(path)

    values = stack.read_env_file(path)
    assert set(generated) == set(stack.SECRETS)
    secrets = [values[name] for name in stack.SECRETS]
    assert all(len(value) >= 24 and stack.URL_SAFE.match(value) for value in secrets)
    assert len(set(secrets)) == len(secrets)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # everything else of the example is kept as it is
    assert values["POSTGRES_DB"] == "dbops"
    assert values["COMPOSE_PROJECT_NAME"] == "dbops"


def test_an_existing_env_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("POSTGRES_PASSWORD=chosen-by-the-operator\n")
    with pytest.raises(FileExistsError):
        stack.create_env_file(path)
    assert path.read_text() == "POSTGRES_PASSWORD=chosen-by-the-operator\n"


def test_up_refuses_missing_or_weak_secrets_naming_each_and_echoing_none(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    path.write_text(
        "POSTGRES_PASSWORD=s3cret-value-one\nAPP_DB_PASSWORD=\nMONITOR_DB_PASSWORD=has@and:colon\n"
        "BACKUP_DB_PASSWORD=b4ckup\nADMIN_PASSWORD=short\nGRAFANA_ADMIN_PASSWORD=gr4f\n"
    )
    the_stack = stack.Stack({"STACK_ENV_FILE": str(path)})

    with pytest.raises(stack.StackError) as caught:
        the_stack.ensure_env_file()

    message = str(caught.value)
    assert caught.value.code == 2
    for name in ("APP_DB_PASSWORD", "MONITOR_DB_PASSWORD", "BACKUP_DB_PASSWORD", "ADMIN_PASSWORD"):
        assert name in message
    # long enough, or (Grafana's) not held to the database's rule
    assert "POSTGRES_PASSWORD" not in message and "GRAFANA_ADMIN_PASSWORD" not in message
    for secret in ("s3cret-value-one", "has@and:colon", "b4ckup", "short", "gr4f"):
        assert secret not in message


def test_the_shell_environment_wins_over_the_env_file(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    path.write_text("OPS_PORT=9188\nCOMPOSE_PROJECT_NAME='from-file'\n")
    the_stack = stack.Stack({"STACK_ENV_FILE": str(path), "OPS_PORT": "19188"})
    assert the_stack.setting("OPS_PORT") == "19188"
    assert the_stack.project == "from-file"


def test_compose_command_names_project_env_file_and_publishes_postgres_only_when_asked(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stack.env"
    path.write_text("COMPOSE_PROJECT_NAME=mine\n")
    base = {"STACK_ENV_FILE": str(path), "COMPOSE": "docker-compose"}

    private = stack.Stack(base).compose("up", "-d")
    published = stack.Stack({**base, "POSTGRES_PUBLISH_PORT": "15432"}).compose("ps")

    assert private[:3] == ["docker-compose", "--project-name", "mine"]
    assert private[private.index("--env-file") + 1] == str(path)
    assert private[-2:] == ["up", "-d"]
    assert not any("postgres-port" in part for part in private)
    assert str(ROOT / "docker" / "compose.postgres-port.yml") in published


def test_stack_without_leaves_services_out_of_up() -> None:
    the_stack = stack.Stack({"STACK_WITHOUT": "grafana, alertmanager"})
    assert the_stack.services == ["postgres", "db-init", "ops", "prometheus"]


@pytest.mark.parametrize(
    ("service", "state", "verdict"),
    [
        ("db-init", {"status": "exited", "exit_code": 0, "health": None, "restarts": 0}, "ok"),
        ("db-init", {"status": "exited", "exit_code": 1, "health": None, "restarts": 0}, "failed"),
        (
            "db-init",
            {"status": "running", "exit_code": 0, "health": None, "restarts": 0},
            "running",
        ),
        ("ops", {"status": "running", "exit_code": 0, "health": "healthy", "restarts": 0}, "ok"),
        (
            "ops",
            {"status": "running", "exit_code": 0, "health": "starting", "restarts": 0},
            "starting",
        ),
        ("ops", {"status": "exited", "exit_code": 0, "health": None, "restarts": 0}, "failed"),
        (
            "ops",
            {"status": "restarting", "exit_code": 2, "health": None, "restarts": 1},
            "restarting",
        ),
        (
            "ops",
            {"status": "running", "exit_code": 2, "health": "starting", "restarts": 3},
            "failed",
        ),
        ("ops", None, "not created"),
    ],
)
def test_wait_verdicts(service: str, state: dict[str, object] | None, verdict: str) -> None:
    assert stack.judge(service, state) == verdict


def test_without_grafana_its_password_is_neither_generated_nor_required(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    the_stack = stack.Stack({"STACK_ENV_FILE": str(path), "STACK_WITHOUT": "grafana"})

    the_stack.ensure_env_file()

    values = stack.read_env_file(path)
    assert "GRAFANA_ADMIN_PASSWORD" not in values or values["GRAFANA_ADMIN_PASSWORD"] == ""
    assert all(len(values[name]) >= 24 for name in the_stack.secrets)
    # the same file with Grafana back in: its password is asked for by name
    with pytest.raises(stack.StackError) as caught:
        stack.Stack({"STACK_ENV_FILE": str(path)}).ensure_env_file()
    assert "GRAFANA_ADMIN_PASSWORD is empty" in str(caught.value)


def test_each_compose_project_gets_its_own_image_tag(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    path.write_text("")
    base = {"STACK_ENV_FILE": str(path)}
    assert stack.Stack(base).image == "dbops:local"
    other = stack.Stack({**base, "COMPOSE_PROJECT_NAME": "staging"})
    assert other.image == "dbops-staging:local"
    assert other.compose_environ()["DBOPS_IMAGE"] == "dbops-staging:local"
    assert stack.Stack({**base, "DBOPS_IMAGE": "registry/dbops:1.2"}).image == "registry/dbops:1.2"


def test_without_grafana_up_links_the_headline_queries_in_prometheus(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    path.write_text("PROMETHEUS_PORT=19090\n")
    the_stack = stack.Stack({"STACK_ENV_FILE": str(path), "STACK_WITHOUT": "grafana"})

    links = dict(the_stack.graph_links())

    assert links["pool utilisation"] == (
        "http://127.0.0.1:19090/graph?g0.expr=pool%3Adbops_pool_utilisation%3Aratio&g0.tab=0"
    )
    assert len(links) == len(stack.HEADLINE_QUERIES)


def test_headline_queries_name_recording_rules_that_exist() -> None:
    rules = (ROOT / "monitoring" / "prometheus" / "rules" / "dbops-recording.yml").read_text()
    for _, expr in stack.HEADLINE_QUERIES:
        if ":" in expr:
            assert f"record: {expr}\n" in rules, expr


def test_an_older_env_file_gets_the_webhook_token_appended_and_keeps_its_lines(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stack.env"
    before = "".join(f"{name}=operator-chosen-{name.lower()}\n" for name in stack.SECRETS[:-1])
    path.write_text(before)
    the_stack = stack.Stack({"STACK_ENV_FILE": str(path)})
    the_stack.ensure_env_file()
    text = path.read_text()
    assert text.startswith(before)
    token = stack.read_env_file(path)["OPS_ALERTS_TOKEN"]
    assert len(token) >= 24 and stack.URL_SAFE.match(token)
    the_stack.ensure_env_file()
    assert path.read_text() == text  # once only


def test_an_empty_or_weak_webhook_token_is_refused_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    others = "".join(f"{name}=operator-chosen-{name.lower()}\n" for name in stack.SECRETS[:-1])
    for value in ("", "short", "has spaces in the token"):
        path.write_text(others + f"OPS_ALERTS_TOKEN={value}\n")
        with pytest.raises(stack.StackError) as caught:
            stack.Stack({"STACK_ENV_FILE": str(path)}).ensure_env_file()
        assert "OPS_ALERTS_TOKEN" in str(caught.value)
        assert stack.read_env_file(path)["OPS_ALERTS_TOKEN"] == value.strip()


def restore_args(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Compose arguments of ``make restore`` as run without a terminal (``-T``)."""
    args = stack.build_parser().parse_args(["restore", *argv])
    on_terminal = stack.exec_args
    stack.exec_args = lambda: ["-T"]
    try:
        result: list[str] = stack.restore_compose_args(stack.Stack(env or {}), args)
    finally:
        stack.exec_args = on_terminal
    return result


def test_restore_passes_name_and_id_to_ops_as_values_never_as_options() -> None:
    args = restore_args(["--target-db=--force", "--", "-x"])
    assert args[-4:] == ["restore", "--target-db=--force", "--", "-x"]
    assert "--force" not in args[:-4] and args[:2] == ["exec", "-T"]


def test_restore_without_a_target_defaults_to_a_new_database_named_after_the_backup() -> None:
    args = restore_args(["20261128T190903Z-4c8050"], {"POSTGRES_DB": "prod"})
    assert "--target-db=prod_restore_20261128t190903z_4c8050" in args
    assert args[2:6] == ["-e", "OPS_HINTS=make", "ops", "ops"]  # in the sidecar, as the backup role


def test_replacing_the_live_database_runs_as_its_owner_in_a_one_off_init_container() -> None:
    args = restore_args(["ID", "--target-db", "dbops", "--force", "--replace-live"])
    assert args[:4] == ["run", "--rm", "--no-deps", "-T"]
    assert args[6:9] == ["db-init", "backup", "restore"]
    assert {"--force", "--replace-live"} <= set(args) and args[-2:] == ["--", "ID"]


def test_restore_from_offsite_passes_the_source_to_ops_before_the_id() -> None:
    args = restore_args(["ID", "--from=offsite"])
    assert args[-3:] == ["--from=offsite", "--", "ID"]
    assert "--from=offsite" not in restore_args(["ID", "--from=local"])


def test_an_unknown_from_is_a_usage_error_naming_the_make_variable() -> None:
    with pytest.raises(stack.StackError) as caught:
        restore_args(["ID", "--from=tape"])
    assert caught.value.code == stack.EXIT_USAGE and str(caught.value).startswith("FROM=tape:")


def test_objectstore_profile_starts_the_demo_store_and_points_offsite_at_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stack.env"
    the_stack = stack.Stack({"STACK_ENV_FILE": str(path), "COMPOSE_PROFILES": "demo,objectstore"})
    the_stack.ensure_env_file()
    token = stack.read_env_file(path)["OBJECTSTORE_TOKEN"]
    assert len(token) >= 24

    assert the_stack.services[0] == "objectstore"
    env = the_stack.compose_environ()
    assert env["OFFSITE_S3_URL"] == "s3://dbops-offsite/dbops"
    assert env["OFFSITE_S3_ENDPOINT_URL"] == "http://objectstore:5000"
    assert env["OFFSITE_CREATE_BUCKET"] == "true"
    assert env["AWS_SECRET_ACCESS_KEY"] == token
    # the key reaches compose through the environment, never its command line
    assert not any(token in part for part in the_stack.compose("up", "-d"))
    # `down` (with the demo profile named) must not drop the objectstore from the profiles
    down = " ".join(the_stack.compose("down", profile=True))
    assert "--profile demo" in down and "--profile objectstore" in down


def test_objectstore_profile_leaves_an_operators_own_store_alone(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    own = {"OFFSITE_S3_URL": "s3://company-backups/db", "AWS_SECRET_ACCESS_KEY": "theirs"}
    the_stack = stack.Stack({"STACK_ENV_FILE": str(path), "COMPOSE_PROFILES": "objectstore", **own})
    the_stack.ensure_env_file()
    env = the_stack.compose_environ()
    assert env["OFFSITE_S3_URL"] == "s3://company-backups/db"
    assert env["AWS_SECRET_ACCESS_KEY"] == "theirs"
    assert "OFFSITE_CREATE_BUCKET" not in env  # a real store's bucket is never created unasked


def test_without_the_objectstore_profile_nothing_points_off_host(tmp_path: Path) -> None:
    the_stack = stack.Stack({"STACK_ENV_FILE": str(tmp_path / "stack.env")})
    assert "objectstore" not in the_stack.services
    assert "OFFSITE_S3_URL" not in the_stack.compose_environ()


def test_recover_takes_from_offsite_and_refuses_other_sources() -> None:
    parser = stack.build_parser()
    args = parser.parse_args(["recover", "--from", "offsite", "--time", "2026-11-28 14:05:00+00"])
    assert args.source == "offsite" and args.time == "2026-11-28 14:05:00+00"
    assert parser.parse_args(["recover"]).source == "local"
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["recover", "--from", "tape"])
    assert caught.value.code == 2
