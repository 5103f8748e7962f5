"""``kronlink submit DATASET --task NAME``: submit an update job without the HTTP service.

Copies the dataset folder into the staging folder, creates the job row (once
per idempotency key), and enqueues the worker's task by name with a payload
from :mod:`kronlink.contract`. The worker deletes the staged copy when the
job ends. Celery is imported here, at the edge, never by the library.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path


def _dataset_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def _lambdas(text: str):
    if text == "auto":
        return "auto"
    values = [float(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def stage_and_submit(args: argparse.Namespace) -> tuple[int, bool]:
    """Stage the dataset, create the job, enqueue it; returns ``(job id, created)``."""
    from pydantic import ValidationError

    from kronlink.contract import UPDATE_TASK, UpdateJobSpec, UpdateMessage
    from kronlink.data.io import load_task
    from kronlink.errors import ConfigError
    from kronlink.registry import (
        AuditAction,
        create_engine_from_url,
        create_job,
        make_session_factory,
        record_audit,
    )
    from kronlink.settings import get_settings

    settings = get_settings()
    source = Path(args.dataset)
    if not source.is_dir():
        raise ConfigError(f"DATASET: expected a task folder (task.json, ...), got {source}")
    load_task(source, max_bytes=settings.max_upload_bytes)  # refuse bad input before staging
    train = json.loads(args.train) if args.train else {}
    for key in ("epochs", "batch_size", "lr", "seed"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    ranker = json.loads(args.ranker) if args.ranker else {"kind": "cnn"}
    digest = _dataset_digest(source)
    staged_id = uuid.uuid4().hex
    try:
        spec = UpdateJobSpec(
            task_name=args.task,
            staged_id=staged_id,
            method=args.method,
            lambdas=_lambdas(args.lam),
            half_decades=args.half_decades,
            quality_gate=args.quality_gate,
            train=train,
            ranker=ranker,
        )
    except ValidationError as exc:
        raise ConfigError(f"job options: {exc}") from None
    key = (
        args.idempotency_key
        or hashlib.sha256(
            json.dumps(
                [args.lineage, digest, spec.model_dump(exclude={"staged_id"})], sort_keys=True
            ).encode()
        ).hexdigest()
    )

    staged = settings.staging_path / staged_id
    settings.staging_path.mkdir(parents=True, exist_ok=True)
    tmp = settings.staging_path / f".{staged_id}.part"
    shutil.copytree(source, tmp)
    os.utime(tmp)  # copytree copies the source's times: the sweep ages from staging
    os.replace(tmp, staged)

    engine = create_engine_from_url(settings.database)
    try:
        factory = make_session_factory(engine)
        with factory.begin() as s:
            job, created = create_job(
                s,
                lineage=args.lineage,
                payload=spec.model_dump(mode="json"),
                idempotency_key=key,
                actor="cli",
            )
            if created:
                size = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())
                record_audit(
                    s,
                    AuditAction.DATA_RECEIVED,
                    f"job:{job.id}",
                    actor="cli",
                    details={"staged_id": staged_id, "bytes": size, "sha256": digest},
                )
    finally:
        engine.dispose()
    if not created:
        shutil.rmtree(staged, ignore_errors=True)  # the first submission's copy serves
    if created or not job.finished:
        _enqueue(settings, UPDATE_TASK, UpdateMessage(job_id=job.id, lineage=args.lineage))
    return job.id, created


def _enqueue(settings, name: str, message) -> None:
    from celery import Celery

    app = Celery("kronlink-submit", broker=settings.broker, set_as_current=False)
    app.conf.broker_transport_options = settings.transport_options(settings.broker)
    app.conf.broker_connection_retry_on_startup = True
    try:
        app.send_task(name, kwargs=message.model_dump(), queue=settings.queue)
    finally:
        app.close()


def wait(job_id: int, timeout_s: float | None, interval_s: float = 1.0) -> int:
    """Poll the job row, print progress; exit code 0 when it succeeded."""
    from kronlink.registry import create_engine_from_url, get_job, make_session_factory
    from kronlink.settings import get_settings

    engine = create_engine_from_url(get_settings().database)
    factory = make_session_factory(engine)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    try:
        while True:
            with factory.begin() as s:
                job = get_job(s, job_id)
            line = f"job {job.id}: {job.state.value}"
            if job.phase:
                p = job.progress
                line += f" [{job.phase}]"
                if p.get("step") is not None:
                    line += f" step {p['step']}/{p.get('total_steps')}"
                if p.get("loss") is not None:
                    line += f" loss {p['loss']:.4f}"
                if p.get("dev_accuracy") is not None:
                    line += f" dev acc {p['dev_accuracy']:.3f}"
            if line != last:
                print(line, file=sys.stderr)
                last = line
            if job.finished:
                if job.error:
                    print(f"job {job.id}: {job.error}", file=sys.stderr)
                return 0 if job.state.value == "succeeded" else 1
            if deadline is not None and time.monotonic() > deadline:
                print(
                    f"job {job.id}: still {job.state.value} after {timeout_s:g} s", file=sys.stderr
                )
                return 3
            time.sleep(interval_s)
    finally:
        engine.dispose()


def run(args: argparse.Namespace) -> int:
    job_id, created = stage_and_submit(args)
    print(job_id)
    if not created:
        print(f"job {job_id} already exists for this submission (idempotency key)", file=sys.stderr)
    if args.wait:
        return wait(job_id, args.timeout)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="submit an update job (copies DATASET to staging; prints the job id)",
        description="Settings come from KRONLINK_* variables (docs/worker.md).",
    )
    p.add_argument("dataset", help="task folder (task.json, ontology.jsonl, queries.jsonl)")
    p.add_argument("--task", required=True, help="task name to record in the registry")
    p.add_argument("--lineage", default="main", help="model lineage (default: %(default)s)")
    p.add_argument("--method", default="kfc", choices=["none", "l2", "ewc", "kfc", "ekfac"])
    p.add_argument(
        "--lambda",
        dest="lam",
        default="auto",
        help="'auto', a number, or one per prior task: 10,1000",
    )
    p.add_argument("--half-decades", action="store_true", help="'auto' searches 1, 3, 10, 30, ...")
    p.add_argument("--quality-gate", type=float, help="minimum test accuracy to activate")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--train", help='TrainConfig fields as JSON, e.g. \'{"device": "cpu"}\'')
    p.add_argument("--ranker", help='version 1 only: ranker as JSON (default {"kind": "cnn"})')
    p.add_argument("--idempotency-key", help="default: a hash of lineage, dataset and options")
    p.add_argument("--wait", action="store_true", help="poll the job and show progress")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    p.set_defaults(func=run)
