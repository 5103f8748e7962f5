"""Real processes for the fault tests: a private redis-server and a private
PostgreSQL cluster that the tests may stop and restart (the shared ones on
6379 and 5432 must never be touched), and ``kronlink worker`` / ``kronlink
serve`` subprocesses configured only through ``KRONLINK_*`` variables.

The servers run on free ports with their data in a private folder; Redis
without persistence (``--save "" --appendonly no``), so a restart loses every
queued message, the harshest case for the broker.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
for _folder in ("worker", "service"):  # their factories (unique basenames, no conftest)
    if str(REPO / "tests" / _folder) not in sys.path:
        sys.path.append(str(REPO / "tests" / _folder))

from service_factories import ADMIN, free_port, wait_until  # noqa: E402
from worker_factories import TINY_RANKER, TINY_TRAIN, make_task  # noqa: E402

from kronlink.data.io import save_task  # noqa: E402
from kronlink.registry import (  # noqa: E402
    ArtifactStore,
    JobInfo,
    create_engine_from_url,
    get_job,
    make_session_factory,
    upgrade,
)
from kronlink.settings import Settings  # noqa: E402
from kronlink.submission import submit_dataset  # noqa: E402
from worker.job import JobContext  # noqa: E402

GATE_DIR = Path(__file__).resolve().parent / "gate"
TIMEOUT_S = 60.0


def unavailable(kind: str, reason: str) -> None:
    """A tool this test needs is missing: fail under CI=true, skip otherwise."""
    import pytest

    msg = f"{kind} is unavailable ({reason})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg + "; CI=true requires it", pytrace=False)
    pytest.skip(msg)


# -- servers -----------------------------------------------------------------
class RedisServer:
    """``redis-server`` on a free port, no persistence; ``stop``/``start`` at will."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.folder = folder
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        with open(self.folder / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        wait_until(self.ping, 10, f"redis-server on port {self.port}", 0.05)

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


class PgCluster:
    """A private PostgreSQL cluster (initdb) on a free port, run as the
    ``postgres`` user; its data folder lies outside pytest's 0700 tmp tree so
    that user can reach it."""

    def __init__(self) -> None:
        bindir = _pg_bin()
        if bindir is None or shutil.which("runuser") is None:
            unavailable("a private PostgreSQL cluster", "no /usr/lib/postgresql/*/bin/pg_ctl")
        self.bin = bindir
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="kronlink-faults-pg-"))
        shutil.chown(self.folder, "postgres", "postgres")
        self.data = self.folder / "data"
        self._as_postgres(
            "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"
        )
        self.admin_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, tool: str, *args: object) -> None:
        argv = ["runuser", "-u", "postgres", "--", str(self.bin / tool), *map(str, args)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{tool} failed ({out.returncode}): {out.stderr[-2000:]}")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            "pg_ctl", "-D", self.data, "-o", opts, "-l", self.folder / "pg.log", "-w", "start"
        )

    def stop(self) -> None:
        """Fast shutdown: open connections are cut, as in a real restart."""
        self._as_postgres("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def create_database(self) -> str:
        from sqlalchemy import create_engine, text

        name = f"kronlink_fault_{uuid.uuid4().hex[:10]}"
        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = self.admin_url.rsplit("/", 1)[0] + f"/{name}"
        upgrade(url)
        return url

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self._as_postgres("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


class Mounts:
    """Real file-system faults: a tiny tmpfs (a full disk) or a read-only bind
    mount (a read-only volume); chmod would not stop root. Undone in reverse."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    @staticmethod
    def _mount(*args: str) -> None:
        out = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise OSError(f"mount {' '.join(args)}: {out.stderr.strip()}")

    def check_permitted(self, probe: Path) -> None:
        probe.mkdir(parents=True, exist_ok=True)
        try:
            self._mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe))
        except OSError as exc:
            unavailable("mount (tmpfs, bind)", str(exc))
        subprocess.run(["umount", str(probe)], check=True, timeout=30)

    def tmpfs(self, path: Path, size: str) -> None:
        self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
        self.points.append(path)

    def read_only(self, path: Path) -> None:
        self._mount("--bind", str(path), str(path))
        self.points.append(path)
        self._mount("-o", "remount,bind,ro", str(path))

    def undo(self) -> None:
        while self.points:
            point = self.points.pop()
            done = subprocess.run(["umount", str(point)], capture_output=True, timeout=30)
            if done.returncode != 0:  # still in use by an exiting process: detach it
                subprocess.run(["umount", "-l", str(point)], check=True, timeout=30)


def fill(folder: Path) -> int:
    """Write ``folder/filler`` until the file system refuses (ENOSPC); bytes written."""
    written = 0
    chunk = b"\0" * 4096
    with open(folder / "filler", "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return written


# -- the deployment ----------------------------------------------------------
@dataclass
class Deployment:
    """Settings shared by the test process and every subprocess it starts."""

    env: dict[str, str]  # KRONLINK_* only
    settings: Settings
    ctx: JobContext
    tmp: Path

    def child_env(self, gate: bool = False) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("KRONLINK_")}
        path = [str(GATE_DIR)] if gate else []
        return {
            **base,
            **self.env,
            "PYTHONPATH": os.pathsep.join([*path, str(REPO)]),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "KRONLINK_TEST_GATE": str(self.tmp / "gate") if gate else "",
        }

    def job(self, job_id: int) -> JobInfo:
        with self.ctx.factory.begin() as s:
            return get_job(s, job_id)

    def submit(self, name: str, seed: int, *, epochs: int = 1, **options: Any) -> int:
        """The real submission path (stage, job row, broker message); the job id.
        A broker that refuses the message raises EnqueueError after the row is stored."""
        from service.queue import CeleryProducer

        folder = self.tmp / "datasets" / f"{name}-{uuid.uuid4().hex[:6]}"
        save_task(make_task(name, seed), folder)
        producer = CeleryProducer(self.settings)
        try:
            sub = submit_dataset(
                folder,
                {
                    "task_name": name,
                    "method": "kfc",
                    "lambdas": 10.0,
                    "train": {**TINY_TRAIN, "epochs": epochs},
                    "ranker": TINY_RANKER,
                    **options,
                },
                settings=self.settings,
                factory=self.ctx.factory,
                enqueue=producer.send,
                actor="test",
            )
        finally:
            producer.close()
        return sub.job.id

    def wait_finished(self, job_id: int, logs: list[Path], timeout_s: float = TIMEOUT_S) -> JobInfo:
        def finished() -> JobInfo | None:
            try:
                job = self.job(job_id)
            except Exception:  # the registry may be the thing that is down
                return None
            return job if job.finished else None

        try:
            return wait_until(finished, timeout_s, f"job {job_id} finished", 0.2)
        except AssertionError:
            tails = "\n".join(
                f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs
            )
            raise AssertionError(
                f"job {job_id} never finished: {self.job(job_id)}\n{tails}"
            ) from None

    def staged(self) -> list[str]:
        root = self.settings.staging_path
        return sorted(p.name for p in root.iterdir()) if root.is_dir() else []

    def artifact_folders(self) -> list[str]:
        """Attempt folders of versions, states and ontologies, and store temporaries."""
        root = Path(self.settings.artifact_url)
        out = []
        for top in ("versions", "states", "ontologies", ".tmp"):
            base = root / top
            if base.is_dir():
                out += sorted(
                    str(p.relative_to(root)) for p in base.glob("*/*" if top != ".tmp" else "*")
                )
        return out

    def versions(self) -> list[tuple[int, int, str, str, int | None]]:
        """(id, number, state, artifact sha256, job id) of every version, by id."""
        from kronlink.registry import list_versions

        with self.ctx.factory.begin() as s:
            rows = list_versions(s)
        return [(v.id, v.number, v.state.value, v.artifact.sha256, v.job_id) for v in rows]

    def assert_consistent(self) -> None:
        """What every fault must leave: no job queued or running, no staged
        data, one active version whose artifact verifies, and no artifact
        folder that no registry row names (no partial version, no debris)."""
        from kronlink.registry import active_version, list_jobs, referenced_artifact_uris

        store = self.ctx.store
        with self.ctx.factory.begin() as s:
            jobs = list_jobs(s)
            active = active_version(s, "main")
            referenced = {store.key_of(u) for u in referenced_artifact_uris(s)}
        unfinished = [(j.id, j.state.value) for j in jobs if not j.finished]
        assert unfinished == [], f"jobs left unfinished: {unfinished}"
        assert self.staged() == [], f"staged data left: {self.staged()}"
        assert active is not None
        store.verify(store.key_of(active.artifact.uri), active.artifact.sha256)
        debris = [
            key
            for key in self.artifact_folders()
            if not any(r == key or r.startswith(key + "/") for r in referenced)
        ]
        assert debris == [], f"artifacts no row names: {debris}"

    def close(self) -> None:
        self.ctx.factory.kw["bind"].dispose()


def make_deployment(tmp: Path, database_url: str, broker_url: str, **overrides: str) -> Deployment:
    """Registry on ``database_url``, broker and results on ``broker_url``,
    artifacts and staging in ``tmp``; short leases and sweeps so recovery
    happens within a test."""
    env = {
        "KRONLINK_DATA_DIR": str(tmp / "data"),
        "KRONLINK_DATABASE_URL": database_url,
        "KRONLINK_BROKER_URL": broker_url,
        "KRONLINK_ARTIFACT_ROOT": str(tmp / "artifacts"),
        "KRONLINK_STAGING_DIR": str(tmp / "staging"),
        "KRONLINK_QUEUE": f"q{uuid.uuid4().hex[:8]}",
        "KRONLINK_ADMIN_TOKEN": ADMIN,
        "KRONLINK_LEASE_S": "3",
        "KRONLINK_STAGED_MAX_AGE_S": "3600",
        "KRONLINK_SWEEP_INTERVAL_S": "1",
        "KRONLINK_PROGRESS_INTERVAL_S": "0.2",
        "KRONLINK_RETRY_DELAY_S": "1",
        "KRONLINK_MODEL_POLL_S": "0.5",
        "KRONLINK_LOG_FORMAT": "text",
        "KRONLINK_TORCH_THREADS": "1",
        **overrides,
    }
    settings = Settings(**{k.removeprefix("KRONLINK_").lower(): v for k, v in env.items()})
    settings.staging_path.mkdir(parents=True, exist_ok=True)
    engine = create_engine_from_url(settings.database)
    ctx = JobContext(
        settings=settings,
        factory=make_session_factory(engine),
        store=ArtifactStore(settings.artifact_url),
        owner="fault-test",
    )
    return Deployment(env, settings, ctx, tmp)


# -- processes ---------------------------------------------------------------
class Child:
    """A subprocess with its stderr in a log file; stopped in order on exit."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as err:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, grace_s: float = 15) -> int | None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_worker(dep: Deployment, log: Path, *, gate: bool = False) -> Child:
    """``kronlink worker`` (it execs celery: the pid is the solo-pool process).
    ``gate``: the job pauses on entering training until :func:`release_gate`."""
    argv = [sys.executable, "-m", "kronlink.cli", "worker", "--loglevel", "INFO"]
    return Child(argv, dep.child_env(gate=gate), log)


def wait_worker_ready(worker: Child, timeout_s: float = TIMEOUT_S) -> None:
    """Until celery logs that the worker consumes (its startup sweep is done
    by then: it runs in the same ``worker_ready`` signal)."""

    def ready() -> bool:
        assert worker.alive(), worker.tail()
        return " ready." in worker.log.read_text(errors="replace")

    wait_until(ready, timeout_s, "the worker ready", 0.1)


def start_service(dep: Deployment, port: int, log: Path) -> Child:
    argv = [sys.executable, "-m", "kronlink.cli", "serve", "--port", str(port)]
    return Child([*argv, "--log-level", "warning"], dep.child_env(), log)


def wait_ready(url: str, child: Child, timeout_s: float = TIMEOUT_S) -> dict:
    def ready() -> dict | None:
        assert child.alive(), child.tail()
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    return wait_until(ready, timeout_s, f"{url} ready", 0.1)


def wait_gate(dep: Deployment, worker: Child, timeout_s: float = TIMEOUT_S) -> None:
    """Until the worker's job has entered training and paused there."""

    def reached() -> bool:
        assert worker.alive(), worker.tail()
        return (dep.tmp / "gate.reached").exists()

    wait_until(reached, timeout_s, "the job reached training", 0.05)


def release_gate(dep: Deployment) -> None:
    (dep.tmp / "gate.release").touch()
