"""docker-compose.yml built and run for real (issue 16 item 14), with podman.

The CPU image is built from the project's Dockerfile on a debootstrapped
Debian base (tests/compose/podman.py); PostgreSQL and Redis come from Debian
packages in a second image. An override file (written below) names those
local images, runs everything on the host's loopback (free ports, so the
machine's own PostgreSQL and Redis are untouched) and takes the GPU
reservation off the worker. The stack then runs as an operator runs it:
PostgreSQL and Redis, the one-shot migration, the API and the worker. A
bootstrap job goes through ``POST /v1/jobs``, the worker trains and commits
version 1, ``/readyz`` turns ready with it, ``/v1/link`` answers with it, and
everything is torn down. The wall time of each stage is printed (docs/operations.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from podman_env import Podman, cache_root, missing_tools

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "compose-admin-token-0123456789"
ONTOLOGY = [
    {"id": "C1", "name": "fever", "synonyms": ["pyrexia"]},
    {"id": "C2", "name": "asthma", "synonyms": ["wheezing"]},
    {"id": "C3", "name": "migraine", "synonyms": ["sick headache"]},
    {"id": "C4", "name": "anemia", "synonyms": ["low hemoglobin"]},
]
MENTIONS = {"C1": "high temperature", "C2": "wheeze", "C3": "bad headache", "C4": "pale and tired"}
TINY = {"kind": "cnn", "tokenizer": None, "embedding_dim": 8, "channels": 8, "hidden_size": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _queries() -> bytes:
    cands = [{"id": c["id"], "name": c["name"]} for c in ONTOLOGY]
    rows = []
    for split, n in (("train", 4), ("dev", 2), ("test", 2)):
        for i in range(n):
            gold = ONTOLOGY[i % len(ONTOLOGY)]["id"]
            rows.append(
                {"mention": MENTIONS[gold], "gold": gold, "candidates": cands, "split": split}
            )
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _override(tag: str, services: str, pg: int, redis: int, api: int) -> str:
    """Local images, host loopback ports, no GPU reservation."""
    env = (
        f"  KRONLINK_DATABASE_URL: postgresql://kronlink:${{POSTGRES_PASSWORD}}@127.0.0.1:{pg}/kronlink\n"
        f"  KRONLINK_BROKER_URL: redis://127.0.0.1:{redis}/0\n"
    )
    return f"""\
x-host-env: &host-env
{env}
services:
  postgres:
    image: {services}
    network_mode: host
    user: postgres
    entrypoint: ["pg-entrypoint.sh"]
    environment: {{PGPORT: "{pg}"}}
  redis:
    image: {services}
    network_mode: host
    user: redis
    working_dir: /data
    entrypoint: ["sh", "-c", "exec \\"$$@\\" --port {redis} --bind 127.0.0.1", "redis"]
  migrate:
    image: {tag}
    network_mode: host
    environment: *host-env
  api:
    image: {tag}
    network_mode: host
    environment:
      <<: *host-env
      KRONLINK_HOST: 127.0.0.1
      KRONLINK_PORT: "{api}"
  worker-gpu0:
    image: {tag}
    network_mode: host
    environment:
      <<: *host-env
      KRONLINK_LEASE_S: "120"
    deploy: !reset {{}}
"""


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def podman() -> Podman:
    missing = missing_tools()
    if missing:
        msg = f"the compose test needs {', '.join(missing)} (make system-deps installs them)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires them", pytrace=False)
        pytest.skip(msg)
    if importlib.util.find_spec("podman_compose") is None:
        pytest.fail("podman-compose is missing from the environment (requirements/test.txt)")
    return Podman(cache_root())


@pytest.fixture
def stack(podman: Podman, tmp_path: Path) -> Iterator[tuple[str, Podman, Path]]:
    t0 = time.monotonic()
    log = tmp_path / "compose.log"
    tag, services = "localhost/kronlink:compose-test", "localhost/kronlink-services:compose-test"
    base = podman.base_image(log)
    podman.build_services(base, services, log)
    podman.build_kronlink(ROOT, base, tag, log)
    podman.prune(log)  # the previous build's image: one build's layers stay cached
    pg, redis, api = _free_port(), _free_port(), _free_port()
    override = tmp_path / "compose.override.yml"
    override.write_text(_override(tag, services, pg, redis, api))
    project = f"kltest{uuid.uuid4().hex[:8]}"
    podman.env.update(
        POSTGRES_PASSWORD=f"pw-{uuid.uuid4().hex}", KRONLINK_ADMIN_TOKEN=ADMIN, PYTHONUNBUFFERED="1"
    )
    # this environment's podman-compose (1.6: host networking, profiles, !reset), not Debian's 1.0
    compose = [sys.executable, "-m", "podman_compose", "-p", project]
    compose += ["-f", str(ROOT / "docker-compose.yml")]
    compose += ["-f", str(override)]

    def up(*services: str, deps: bool = False) -> None:
        extra = [] if deps else ["--no-deps"]
        podman.run(*compose, "up", "-d", "--no-build", *extra, *services, log=log, timeout=300)

    def container(service: str) -> str:
        return f"{project}_{service}_1"

    try:
        t_up = time.monotonic()
        # Podman runs no healthchecks without systemd, so the compose file's
        # "service_healthy" conditions are waited for here, in their order.
        up("postgres", "redis")
        _wait(
            lambda: podman.run(
                "podman", "exec", container("postgres"), "pg_isready", "-q",
                "-h", "127.0.0.1", "-p", str(pg), "-U", "kronlink", "-d", "kronlink", check=False,
            ).returncode == 0,
            60, "PostgreSQL ready",
        )  # fmt: skip
        _wait(
            lambda: "PONG" in podman.run(
                "podman", "exec", container("redis"), "redis-cli", "-p", str(redis), "ping",
                check=False,
            ).stdout,
            60, "Redis ready",
        )  # fmt: skip
        up("migrate")
        code = podman.run("podman", "wait", container("migrate"), timeout=300).stdout.strip()
        migrate_log = podman.run("podman", "logs", container("migrate"), check=False)
        assert code == "0", migrate_log.stdout + migrate_log.stderr
        assert "at revision" in migrate_log.stdout + migrate_log.stderr
        up("api", "worker-gpu0")
        podman.timings["stack up"] = round(time.monotonic() - t_up, 1)
        yield f"http://127.0.0.1:{api}", podman, log
    finally:
        for service in ("api", "worker-gpu0", "migrate"):
            out = podman.run("podman", "logs", "--tail", "40", container(service), check=False)
            with log.open("a") as f:
                f.write(f"\n--- {service} ---\n{out.stdout}{out.stderr}")
        t_down = time.monotonic()
        podman.run(*compose, "down", "-v", "-t", "10", check=False, log=log, timeout=300)
        podman.run("podman", "volume", "prune", "-f", check=False, log=log)  # anonymous /data
        left = podman.run("podman", "ps", "-a", "--filter", f"name={project}", "-q", check=False)
        podman.timings["stack down"] = round(time.monotonic() - t_down, 1)
        podman.timings["total"] = round(time.monotonic() - t0, 1)
        print(f"\ncompose stack timings (s): {podman.timings}; log {log}")
        if os.environ.get("KRONLINK_COMPOSE_TIMINGS"):  # a record for docs/operations.md
            record = {"timings_s": podman.timings, "cache": str(podman.root)}
            record["loadavg"] = os.getloadavg()
            Path(os.environ["KRONLINK_COMPOSE_TIMINGS"]).write_text(json.dumps(record, indent=1))
        assert left.stdout.strip() == "", f"containers left behind: {left.stdout}"


def test_compose_stack_bootstraps_and_links(stack) -> None:
    url, podman, log = stack
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=url, timeout=30) as c:

        def answers():
            try:
                return c.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        _wait(answers, 120, "the API answers")
        ready = c.get("/readyz")
        assert ready.status_code == 503  # no version yet; the registry is there
        assert ready.json()["registry"]["ok"] is True

        form = {
            "task": "toy",
            "method": "none",
            "epochs": "2",
            "ranker": json.dumps(TINY),
        }
        files = {
            "queries": ("queries.jsonl", _queries()),
            "ontology": ("ontology.jsonl", "".join(json.dumps(o) + "\n" for o in ONTOLOGY)),
        }
        t0 = time.monotonic()
        r = c.post("/v1/jobs", data=form, files=files, headers=auth)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]

        def finished():
            j = c.get(f"/v1/jobs/{job_id}", headers=auth).json()
            return j if j["state"] in ("succeeded", "failed", "cancelled") else None

        job = _wait(finished, 300, f"job {job_id} finished", interval_s=1)
        podman.timings["bootstrap job"] = round(time.monotonic() - t0, 1)
        assert job["state"] == "succeeded", (job, log.read_text(errors="replace")[-3000:])
        assert job["phase"] is None and job["version_id"] is not None

        def ready_with_v1():
            r = c.get("/readyz")
            return r.status_code == 200 and r.json()

        body = _wait(ready_with_v1, 60, "readyz with version 1")  # fmt: skip
        assert body["checks"]["model:main"]["version"]["number"] == 1
        versions = c.get("/v1/versions").json()
        assert [(v["number"], v["state"]) for v in versions] == [(1, "active")]

        link = c.post("/v1/link", json={"mention": "pyrexia", "ontology": "toy", "top_k": 2})
        assert link.status_code == 200, link.text
        out = link.json()
        # only C1 shares a word with "pyrexia": the one candidate there is
        assert out["model_version"]["number"] == 1
        assert [r["id"] for r in out["results"]] == ["C1"] and out["no_match"] is False
