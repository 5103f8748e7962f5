"""docker-compose.yml and Dockerfile against the code they run.

No Docker engine here: the compose file is parsed as YAML (anchors and merge
keys resolved), its commands are parsed by the real ``kronlink`` argument
parser, its environment builds a real :class:`Settings` (production rules
included), and ports, volumes, hosts and the healthcheck are checked against
what that settings object and the service app declare. ``docker compose
config`` (or Debian's ``docker-compose config``) validates the file when one
is installed (``make system-deps``); under CI=true it must be.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from kronlink.cli import build_parser
from kronlink.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
# What an operator exports before `docker compose up` (the file requires both).
OPERATOR_ENV = {"KRONLINK_ADMIN_TOKEN": "a" * 32, "POSTGRES_PASSWORD": "pw-for-the-test"}
KRONLINK_SERVICES = {"migrate": ["db", "upgrade"], "api": ["serve"], "worker-gpu0": ["worker"]}

_VAR = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return _VAR.sub(one, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), OPERATOR_ENV)


def kronlink_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping, so anchors merge"
    return {k: str(v) for k, v in env.items()}


def settings_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("KRONLINK_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_services_and_profiles(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker-gpu0", "flower"}
    assert services["flower"]["profiles"] == ["flower"]
    assert all("profiles" not in s for n, s in services.items() if n != "flower")
    assert set(compose["volumes"]) == {"pgdata", "redisdata", "kronlink-data"}


def test_commands_are_real_cli_commands(compose):
    parser = build_parser()
    for name, expected in KRONLINK_SERVICES.items():
        command = compose["services"][name]["command"]
        assert command[0] == "kronlink", name
        args = parser.parse_args(command[1:])  # exits (SystemExit) on an unknown flag
        got = [args.command, *([args.db_command] if args.command == "db" else [])]
        assert got == expected, name


def test_environment_builds_production_settings(compose, monkeypatch):
    fields = {f"KRONLINK_{name.upper()}" for name in Settings.model_fields}
    services = compose["services"]
    for name in KRONLINK_SERVICES:
        env = kronlink_env(services[name])
        unknown = {k for k in env if k.startswith("KRONLINK_")} - fields
        assert not unknown, f"{name}: variables no setting reads: {unknown}"
        s = settings_of(env, monkeypatch)  # raises ConfigError on unsafe combinations
        assert s.environment == "production"
        db = urlsplit(s.database)
        pg = services["postgres"]["environment"]
        assert (db.hostname, db.port, db.username, db.password, db.path.lstrip("/")) == (
            "postgres",
            5432,
            pg["POSTGRES_USER"],
            pg["POSTGRES_PASSWORD"],
            pg["POSTGRES_DB"],
        )
        broker = urlsplit(s.broker)
        assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)
        assert s.backend == s.broker  # Celery results in the same Redis
        assert s.transport_options(s.broker)["visibility_timeout"] >= 2 * s.longest_job_s
    flower = services["flower"]["environment"]
    assert flower["CELERY_BROKER_URL"] == kronlink_env(services["api"])["KRONLINK_BROKER_URL"]


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> volume name"""
    out = {}
    for m in service.get("volumes", []):
        source, target = m.split(":")[:2]
        out[target] = source
    return out


def test_volumes_hold_what_the_settings_point_at(compose, monkeypatch):
    services = compose["services"]
    workers = [n for n in services if n.startswith("worker-")]
    shared: set[str] = set()
    data_dirs = []
    for name in ["api", *workers]:
        s = settings_of(kronlink_env(services[name]), monkeypatch)
        mounts = _mounts(services[name])
        for path in (Path(s.artifact_url), s.staging_path, s.data_path):
            holders = [t for t in mounts if path.is_relative_to(t)]
            assert holders, f"{name}: {path} is on no volume (lost with the container)"
            shared.add(mounts[holders[0]])
        if name in workers:
            data_dirs.append(s.data_path)
    # The API stages uploads and the workers read them and write artifacts:
    # one volume for both, so a staged dataset and an artifact are seen by all.
    assert shared == {"kronlink-data"}
    assert len(set(data_dirs)) == len(data_dirs), "each worker its own Celery state file"
    assert _mounts(services["postgres"]) == {"/var/lib/postgresql/data": "pgdata"}
    assert _mounts(services["redis"]) == {"/data": "redisdata"}


def test_api_port_and_healthcheck_match_the_app(compose, monkeypatch):
    api = compose["services"]["api"]
    s = settings_of(kronlink_env(api), monkeypatch)
    assert s.host == "0.0.0.0"  # reachable from outside the container
    container_ports = {int(p.rsplit(":", 1)[1]) for p in api["ports"]}
    assert container_ports == {s.port}
    docker = DOCKERFILE.read_text()
    assert re.search(rf"^EXPOSE {s.port}$", docker, re.M)
    assert re.search(rf"^\s+KRONLINK_PORT={s.port}", docker, re.M)

    from service.app import create_app

    paths = create_app(Settings(data_dir=Path("/nonexistent"))).openapi()["paths"]
    healthcheck = re.search(r"^HEALTHCHECK .*\n(?:.*\\\n)*.*$", docker, re.M)[0]
    assert "/healthz" in healthcheck and "/healthz" in paths
    for name in ("migrate", *[n for n in compose["services"] if n.startswith("worker-")]):
        assert compose["services"][name]["healthcheck"] == {"disable": True}, name


def test_gpu_workers_and_start_order(compose):
    services = compose["services"]
    workers = {n: s for n, s in services.items() if n.startswith("worker-")}
    gpus, hostnames = [], []
    for w in workers.values():
        (device,) = w["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
        hostnames.append(w["command"][w["command"].index("--hostname") + 1])
        assert w["build"]["args"]["VARIANT"] == "cuda"
        assert w["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert len(set(gpus)) == len(gpus), "one worker per GPU"
    assert len(set(hostnames)) == len(hostnames)
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"


def test_dockerfile_variants_user_and_sources():
    docker = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cpu$", docker, re.M)
    assert "cpu)" in docker and "cuda)" in docker
    users = re.findall(r"^USER (\S+)$", docker, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^CMD \["kronlink", "serve"\]$', docker, re.M)
    copied = set(re.findall(r"^COPY (\S+)/ ", docker, re.M))
    # Every package the project installs, and migrations for `kronlink db upgrade`.
    assert {"kronlink", "worker", "service", "migrations", "requirements"} <= copied
    torch_pin = re.search(
        r"^torch==(\S+)$", (ROOT / "requirements/constraints.txt").read_text(), re.M
    )
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch_pin[1])}$", docker, re.M)


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_config_accepts_the_file(tmp_path):
    cli = _compose_cli()
    if cli is None:
        msg = "neither `docker compose` nor `docker-compose` is installed (make system-deps)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires one", pytrace=False)
        pytest.skip(msg)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **OPERATOR_ENV}
    for profile in ([], ["--profile", "flower"]):
        r = subprocess.run(
            [*cli, "-f", str(COMPOSE), *profile, "config", "-q"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
    # Without the operator's secrets the file refuses to start anything.
    r = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "POSTGRES_PASSWORD" in r.stderr + r.stdout
