"""``kronlink submit DATASET --task NAME``: submit an update job without the HTTP service.

Copies the dataset folder into the staging folder, creates the job row (once
per idempotency key), and enqueues the worker's task by name with a payload
from :mod:`kronlink.contract`. The worker deletes the staged copy when the
job ends. Celery is imported here, at the edge, never by the library.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kronlink.penalties import DEFAULT_METHOD, PenaltyMethod


def _lambdas(text: str):
    from kronlink.submission import parse_lambdas

    value = parse_lambdas(text)
    return list(value) if isinstance(value, tuple) else value


def _json_object(option: str, text: str) -> dict:
    from kronlink.errors import ConfigError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option}: expected a JSON object, got {type(value).__name__}")
    return value


def stage_and_submit(args: argparse.Namespace) -> tuple[int, bool]:
    """Stage the dataset, create the job, enqueue it; returns ``(job id, created)``."""
    from kronlink.registry import create_engine_from_url, make_session_factory
    from kronlink.settings import get_settings
    from kronlink.submission import submit_dataset

    settings = get_settings()
    train = _json_object("--train", args.train) if args.train else {}
    for key in ("epochs", "batch_size", "lr", "seed"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    options = {
        "task_name": args.task,
        "method": args.method,
        "lambdas": _lambdas(args.lam),
        "half_decades": args.half_decades,
        "quality_gate": args.quality_gate,
        "train": train,
        "ranker": _json_object("--ranker", args.ranker) if args.ranker else {"kind": "cnn"},
        "ontology": args.ontology,
    }
    engine = create_engine_from_url(settings.database)
    try:
        sub = submit_dataset(
            Path(args.dataset),
            options,
            settings=settings,
            factory=make_session_factory(engine),
            enqueue=lambda message: send_update(settings, message),
            lineage=args.lineage,
            idempotency_key=args.idempotency_key,
            actor="cli",
        )
    finally:
        engine.dispose()
    return sub.job.id, sub.created


def send_update(settings, message) -> None:
    """Send one update message by task name (a one-shot producer: the CLI exits after)."""
    from celery import Celery

    from kronlink.contract import UPDATE_TASK

    app = Celery("kronlink-submit", broker=settings.broker, set_as_current=False)
    app.conf.broker_transport_options = settings.transport_options(settings.broker)
    app.conf.broker_connection_retry_on_startup = True
    try:
        app.send_task(UPDATE_TASK, kwargs=message.model_dump(), queue=settings.queue)
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
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD.value,
        choices=[m.value for m in PenaltyMethod],
        help="penalty against the prior tasks (default: %(default)s)",
    )
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
    p.add_argument("--ontology", help="ontology name to record (default: the task name)")
    p.add_argument("--idempotency-key", help="default: a hash of lineage, dataset and options")
    p.add_argument("--wait", action="store_true", help="poll the job and show progress")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    p.set_defaults(func=run)
