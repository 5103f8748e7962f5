"""The demo's steps: task builds, ``kronlink up``, job submission and following."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from kronlink.cli._demo_http import Api, DemoError, detail

LINEAGE = "main"
FINISHED = ("succeeded", "failed", "cancelled")


def say(msg: str) -> None:
    print(msg, flush=True)


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
        f"[2/5] starting service and worker (kronlink up, embedded default; log {show_path(logs / 'up.log')}) ..."
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
    files = {"queries": folder / "queries.jsonl", "ontology": folder / "ontology.jsonl"}
    status, job = api.call("POST", "/v1/jobs", data=fields, files=files)
    if status not in (200, 202):
        raise DemoError(f"POST /v1/jobs ({fields['task']}): HTTP {status}: {detail(job)}")
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
    for line in top1_table(job.get("metrics") or {}):
        say(line)
    if forgetting and job.get("version_id") is not None:
        # a bare number reads as a measured loss; say what it is, as the dashboard does
        scale = api.get(f"/v1/versions/{job['version_id']}").get("forgetting_scale") or {}
        if scale.get("label"):
            say(f"      predicted forgetting is a {scale['label']}")


def top1_table(metrics: dict[str, Any]) -> list[str]:
    """Dev and test top-1 of BM25, the retriever, the model alone and the
    served score (model, exact-name and retrieval priors), from a version's
    metrics; no lines for a version fitted without the retrieval prior."""
    prior = metrics.get("retrieval_prior")
    if not prior:
        return []
    info = prior.get("info") or {}
    alone = (metrics.get("ablations") or {}).get("model_alone") or {}
    mode = metrics.get("retriever_mode") or "bm25"

    def acc(d: dict[str, Any] | None) -> float | None:
        return (d or {}).get("accuracy")

    rows = [
        (
            "BM25",
            info.get("dev_top1_bm25", info.get("dev_top1_retriever")),
            info.get("test_top1_bm25", info.get("test_top1_retriever")),
        ),
        (f"retriever ({mode})", info.get("dev_top1_retriever"), info.get("test_top1_retriever")),
        ("model alone", acc(alone.get("dev")), acc(alone.get("test"))),
        ("model + priors (served)", acc(metrics.get("dev")), acc(metrics.get("test"))),
    ]

    def cell(v: float | None) -> str:
        return f"{v:6.3f}" if v is not None else "     -"

    out = [f"      {'top-1':<26}{'dev':>6}  {'test':>6}"]
    out += [f"      {name:<26}{cell(d)}  {cell(t)}" for name, d, t in rows]
    out.append(f"      (retrieval prior beta {prior.get('beta', 0):.3g}, fitted on dev)")
    return out


def wait_served(api: Api, timeout_s: float = 30.0) -> None:
    """Until this replica answers with the lineage's active version (it polls every second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        versions = api.get(f"/v1/versions?lineage={LINEAGE}&state=active")
        if versions and versions[0].get("served_here"):
            return
        time.sleep(0.5)


# The demo's example: a lay mention a user would type, which a clinician maps to
# HPO's Hypertension (HP:0000822, whose stored synonyms include it). A test
# mention drawn from the task would mostly show what the small demo model gets wrong.
EXAMPLE = {"mention": "high blood pressure", "ontology": "hpo"}


def show_path(path: Path) -> str:
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
