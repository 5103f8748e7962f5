"""``kronlink demo``: the README's first command, end to end on the embedded default.

1. builds the ICD-10-CM and HPO tasks (a seeded subset; ``--full`` for all);
2. starts ``kronlink up`` (service and worker; SQLite registry and broker
   under ``<dir>/data``; their logs in ``<dir>/logs/up.log``);
3. submits ICD-10-CM through ``POST /v1/jobs`` as version 1 (a bootstrap:
   a fresh ranker, no penalty) and follows the job;
4. submits HPO the same way as an update under KFC and follows it;
5. checks ``/v1/link`` once, then prints the dashboard URL and a ready
   ``curl``, and keeps the service running until Ctrl-C (``--exit``: stops).

Re-running is safe: task folders already built with the same size are kept,
a task the active version already learned is not submitted again, Ctrl-C
(or SIGTERM) cancels the job being followed before stopping the service, a
job of an earlier run that is still open (that run was killed) is followed
instead of duplicated, and a demo server still running on the port (its pid
in ``<dir>/up.pid``) is reused. The HTTP calls use the standard library only: this module imports
nothing of ``service/`` or ``worker/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kronlink.errors import KronlinkError

LINEAGE = "main"
SUBSET = 1000  # queries per task before splitting: about 790 train, 100 dev, 100 test
# The demo's default is the CNN ranker: on 2 CPU cores its two jobs (training,
# the new task's curvature, evaluation) take minutes; MiniLM's first 3 layers
# take about half an hour there (a GPU is advised: --ranker transformer).
RANKERS = {
    "cnn": {"kind": "cnn"},
    # 32 tokens fit a mention and a concept name (these tasks have no context)
    # at half the cost of the default 64.
    "transformer": {"kind": "transformer", "max_length": 32},
}
DEFAULT_LR = {"cnn": 1e-3, "transformer": 3e-4}
FINISHED = ("succeeded", "failed", "cancelled")


class DemoError(KronlinkError):
    """The demo cannot go on; the message says what to do."""


def say(msg: str) -> None:
    print(msg, flush=True)


# -- HTTP (standard library) ---------------------------------------------------
@dataclass
class Api:
    base: str
    token: str

    def call(
        self, method: str, path: str, *, body: bytes | None = None, ctype: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if ctype:
            headers["Content-Type"] = ctype
        req = urllib.request.Request(self.base + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"detail": raw.decode(errors="replace")[:500]}

    def get(self, path: str) -> Any:
        status, body = self.call("GET", path)
        if status != 200:
            raise DemoError(f"GET {path}: HTTP {status}: {_detail(body)}")
        return body

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/healthz", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False


def _detail(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)
    return str(body)


def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    for name, path in files.items():
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{path.name}"\r\nContent-Type: application/x-ndjson\r\n\r\n'
        ).encode()
        out += path.read_bytes() + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


# -- steps -----------------------------------------------------------------------
def build_tasks(out: Path, limit: int | None, candidates: int) -> None:
    wanted = []
    for name in ("icd10cm", "hpo"):
        meta = out / name / "task.json"
        if meta.is_file():
            m = json.loads(meta.read_text()).get("meta", {})
            if m.get("limit") == limit and m.get("k") == candidates:
                continue
        wanted.append(name)
    if not wanted:
        say(f"[1/5] tasks: {out}/icd10cm and {out}/hpo are built already")
        return
    size = "all queries" if limit is None else f"{limit} queries each"
    say(f"[1/5] building {', '.join(wanted)} ({size}, {candidates} candidates a query) ...")
    from kronlink.data.builders import build_task
    from kronlink.data.io import save_task

    for name in wanted:
        t0 = time.perf_counter()
        task = build_task(name, seed=0, split_rule="mention", k=candidates, limit=limit)
        save_task(task, out / name)
        sizes = ", ".join(f"{s} {len(task.split(s))}" for s in ("train", "dev", "test"))
        say(
            f"      {name}: {len(task.concepts)} concepts; {sizes} ({time.perf_counter() - t0:.0f} s)"
        )


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # as uvicorn binds: a port left in TIME_WAIT by the last run is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def start_up(args: argparse.Namespace, env: dict[str, str], api: Api) -> subprocess.Popen | None:
    """Start ``kronlink up``; None when an earlier demo's server is still running."""
    pid_file = args.dir / "up.pid"
    if not _port_free(args.host, args.port):
        pid = int(pid_file.read_text()) if pid_file.is_file() else 0
        if pid and _alive(pid) and api.healthy():
            say(f"[2/5] reusing the demo server already running at {api.base} (pid {pid})")
            return None
        raise DemoError(f"port {args.port} is in use by something else: stop it or pass --port")
    logs = args.dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = (logs / "up.log").open("ab")
    cmd = [
        sys.executable,
        "-m",
        "kronlink.cli",
        "up",
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    say(
        f"[2/5] starting service and worker (kronlink up, embedded default; log {_show(logs / 'up.log')}) ..."
    )
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + args.start_timeout
    while not api.healthy():
        if proc.poll() is not None:
            raise DemoError(f"kronlink up exited with {proc.returncode}; see {logs / 'up.log'}")
        if time.monotonic() > deadline:
            stop(proc)
            raise DemoError(f"the service did not answer within {args.start_timeout:g} s")
        time.sleep(0.5)
    say(f"      service up at {api.base}")
    return proc


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # kronlink up stops its service and worker in order
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def learned_tasks(api: Api) -> list[str]:
    """Tasks carried by the lineage's active version (its own and its ancestors')."""
    versions = {v["id"]: v for v in api.get(f"/v1/versions?lineage={LINEAGE}")}
    names = {t["id"]: t["name"] for t in api.get("/v1/tasks")}
    active = next((v for v in versions.values() if v["state"] == "active"), None)
    out = []
    while active is not None:
        if active["task_id"] is not None:
            out.append(names.get(active["task_id"], "?"))
        active = versions.get(active["parent_id"])
    return out[::-1]


def open_job(api: Api, task: str) -> dict[str, Any] | None:
    """A job of an earlier run for this task that is still queued or running."""
    for j in api.get(f"/v1/jobs?lineage={LINEAGE}"):  # newest first
        if j["options"].get("task_name") == task and j["state"] not in FINISHED:
            return j
    return None


def submit(api: Api, folder: Path, fields: dict[str, str]) -> dict[str, Any]:
    body, ctype = _multipart(
        fields, {"queries": folder / "queries.jsonl", "ontology": folder / "ontology.jsonl"}
    )
    status, job = api.call("POST", "/v1/jobs", body=body, ctype=ctype)
    if status not in (200, 202):
        raise DemoError(f"POST /v1/jobs ({fields['task']}): HTTP {status}: {_detail(job)}")
    return job


def _line(job: dict[str, Any]) -> str:
    if job["state"] in FINISHED:
        return job["state"]
    p = job.get("progress") or {}
    bits = [job["state"], job.get("phase") or ""]
    if p.get("total_steps"):
        bits.append(f"step {p.get('step')}/{p['total_steps']}")
    if p.get("epoch") is not None:
        bits.append(f"epoch {p['epoch']}")
    if p.get("loss") is not None:
        bits.append(f"loss {p['loss']:.3f}")
    if p.get("dev_accuracy") is not None:
        bits.append(f"dev acc. {p['dev_accuracy']:.3f}")
    if p.get("message") and not p.get("total_steps"):
        bits.append(str(p["message"]))
    return " · ".join(b for b in bits if b)


def follow(api: Api, job: dict[str, Any], label: str) -> dict[str, Any]:
    """Print the job's progress until it ends; DemoError unless it succeeded.
    Interrupted, it cancels the job first, so a re-run starts clean."""
    last = None
    t0 = time.monotonic()
    try:
        while True:
            line = _line(job)
            if line != last:
                say(f"      {label} job {job['id']} [{time.monotonic() - t0:4.0f} s] {line}")
                last = line
            if job["state"] in FINISHED:
                break
            time.sleep(2)
            job = api.get(f"/v1/jobs/{job['id']}")
    except KeyboardInterrupt:
        cancel(api, job["id"])
        raise
    if job["state"] != "succeeded":
        raise DemoError(f"{label} job {job['id']} {job['state']}: {job.get('error')}")
    return job


def cancel(api: Api, job_id: int, timeout_s: float = 60.0) -> None:
    """Cancel a job and wait until its worker stops it (it checks at each heartbeat)."""
    say(f"\n      cancelling job {job_id} ...")
    api.call("DELETE", f"/v1/jobs/{job_id}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, job = api.call("GET", f"/v1/jobs/{job_id}")
        if status != 200 or job["state"] in FINISHED:
            return
        time.sleep(1)


def run_job(api: Api, step: str, task: str, folder: Path, fields: dict[str, str]) -> None:
    if task in learned_tasks(api):
        say(f"{step} {task}: the active version has learned it already")
        return
    job = open_job(api, task)
    if job is None:
        say(f"{step} submitting {task} through POST /v1/jobs ({fields['method']}) ...")
        # A fresh key: the demo checks for learned tasks and open jobs itself, and a
        # dataset cancelled by an earlier run must not map back to that cancelled job.
        job = submit(api, folder, {**fields, "idempotency_key": f"demo-{task}-{uuid.uuid4().hex}"})
    else:
        say(f"{step} following {task}'s job {job['id']} from an earlier run ...")
    job = follow(api, job, task)
    test = (job.get("metrics") or {}).get("test") or {}
    forgetting = (job.get("metrics") or {}).get("predicted_forgetting") or {}
    extra = "".join(f"; predicted forgetting of {k}: {v:.3g}" for k, v in forgetting.items())
    acc = test.get("accuracy")
    say(
        f"      {task}: version {job.get('version_id')} active; test accuracy {acc:.3f}{extra}"
        if acc is not None
        else f"      {task}: done"
    )


def wait_served(api: Api, timeout_s: float = 30.0) -> None:
    """Until this replica answers with the lineage's active version (it polls every second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        versions = api.get(f"/v1/versions?lineage={LINEAGE}&state=active")
        if versions and versions[0].get("served_here"):
            return
        time.sleep(0.5)


def sample_mention(folder: Path) -> str:
    with (folder / "queries.jsonl").open(encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)
            if q.get("split") == "test":
                return q["mention"]
    return "short stature"


def _show(path: Path) -> str:
    """A path as the user typed it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def admin_token(path: Path) -> str:
    """The demo's admin token, made once and kept (mode 600) so re-runs reuse it."""
    if path.is_file():
        return path.read_text().strip()
    token = secrets.token_urlsafe(24)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the demo the way Ctrl-C does: cleanly


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args)
    except KeyboardInterrupt:  # the service and worker were stopped on the way out
        say("\nstopped")
        return 130


def _run(args: argparse.Namespace) -> int:
    args.dir = Path(args.dir).resolve()
    args.dir.mkdir(parents=True, exist_ok=True)
    limit = None if args.full else args.limit
    build_tasks(args.dir / "tasks", limit, args.candidates)

    token = admin_token(args.dir / "admin-token")
    env = {
        **os.environ,
        "KRONLINK_DATA_DIR": str(args.dir / "data"),
        "KRONLINK_ADMIN_TOKEN": token,
        "KRONLINK_LINEAGES": LINEAGE,
        "KRONLINK_LOG_FORMAT": "text",
        # A short lease: a job whose worker was killed (the demo killed hard) is
        # requeued within seconds of the next start, not after ten minutes.
        "KRONLINK_LEASE_S": "30",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    for key in (
        "KRONLINK_DATABASE_URL",
        "KRONLINK_BROKER_URL",
        "KRONLINK_RESULT_BACKEND",
        "KRONLINK_ARTIFACT_ROOT",
        "KRONLINK_STAGING_DIR",
        "KRONLINK_READ_TOKEN",
    ):
        env.pop(key, None)  # the demo is the embedded default, whatever the shell has
    api = Api(f"http://{args.host}:{args.port}", token)
    proc = start_up(args, env, api)
    try:
        lr = args.lr if args.lr is not None else DEFAULT_LR[args.ranker]
        train = {"epochs": args.epochs, "lr": lr, "seed": 0}
        tasks = args.dir / "tasks"
        run_job(
            api,
            "[3/5]",
            "icd10cm",
            tasks / "icd10cm",
            {
                "task": "icd10cm",
                "lineage": LINEAGE,
                "method": "none",
                "ranker": json.dumps(RANKERS[args.ranker]),
                "train": json.dumps(train),
            },
        )
        run_job(
            api,
            "[4/5]",
            "hpo",
            tasks / "hpo",
            {
                "task": "hpo",
                "lineage": LINEAGE,
                "method": "kfc",
                "lambda": args.lam,
                "train": json.dumps(train),
            },
        )
        wait_served(api)
        mention = sample_mention(tasks / "hpo")
        query = {"mention": mention, "ontology": "hpo", "top_k": 3}
        status, answer = api.call(
            "POST", "/v1/link", body=json.dumps(query).encode(), ctype="application/json"
        )
        if status != 200:
            raise DemoError(f"POST /v1/link: HTTP {status}: {_detail(answer)}")
        top = answer["results"][0] if answer.get("results") else None
        served = answer.get("model_version") or {}
        say(
            f"[5/5] /v1/link answers with version {served.get('number')}: "
            f"{mention!r} -> {top and top['id']} {top and top['name']!r}"
        )
        curl_body = json.dumps(query).replace("'", "'\\''")
        say("")
        say(
            f"  dashboard   {api.base}/dashboard   (admin token for rollbacks: {_show(args.dir / 'admin-token')})"
        )
        say(f"  API docs    {api.base}/docs")
        say(
            f"  try         curl -s {api.base}/v1/link -H 'Content-Type: application/json' "
            f"-d '{curl_body}'"
        )
        if args.exit or proc is None:
            return 0
        say("\nService and worker keep running; Ctrl-C stops them.")
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop below
            proc.wait()
        return 0
    finally:
        if proc is not None:
            stop(proc)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="end to end: build tasks, start service and worker, learn ICD-10-CM then HPO over HTTP",
        description=(
            "Builds the ICD-10-CM and HPO tasks, starts `kronlink up` on the embedded default "
            "under DIR/data, submits ICD-10-CM (version 1) and HPO (a KFC update) through "
            "POST /v1/jobs, and prints the dashboard URL and a curl for /v1/link. Safe to re-run."
        ),
    )
    p.add_argument(
        "--dir", default="demo", help="where tasks, data and logs go (default: %(default)s)"
    )
    p.add_argument(
        "--full", action="store_true", help="the whole tasks, not a subset (GPU advised)"
    )
    p.add_argument(
        "--limit",
        type=int,
        default=SUBSET,
        help="queries per task without --full (default: %(default)s)",
    )
    p.add_argument("--candidates", type=int, default=10, help="per query (default: %(default)s)")
    p.add_argument(
        "--ranker",
        choices=list(RANKERS),
        default="cnn",
        help="version 1's ranker: cnn (default, minutes on a CPU) or transformer "
        "(MiniLM's first 3 layers: a GPU is advised)",
    )
    p.add_argument("--epochs", type=int, default=2, help="per task (default: %(default)s)")
    p.add_argument(
        "--lr", type=float, default=None, help="default: 1e-3 for cnn, 3e-4 for transformer"
    )
    p.add_argument(
        "--lambda",
        dest="lam",
        default="10",
        help="KFC λ for HPO: a number or 'auto' (a λ search: slower) (default: %(default)s)",
    )
    p.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument(
        "--start-timeout", type=float, default=120.0, help="seconds for the service to answer"
    )
    p.add_argument("--exit", action="store_true", help="stop the service when done")
    p.set_defaults(func=run)
