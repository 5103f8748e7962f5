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
in ``<dir>/up.pid``) is reused. The HTTP calls go through httpx (``_demo_http``); the steps live in
``_demo_steps``. Nothing of ``service/`` or ``worker/`` is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
from pathlib import Path

from kronlink.cli._common import port_number
from kronlink.cli._demo_http import Api, DemoError, detail
from kronlink.cli._demo_steps import (
    EXAMPLE,
    LINEAGE,
    admin_token,
    build_tasks,
    run_job,
    say,
    show_path,
    start_up,
    stop,
    wait_served,
)

SUBSET = 1000  # queries per task before splitting: about 790 train, 100 dev, 100 test
# The demo's default is the CNN ranker: on 2 CPU cores its two jobs (training,
# the new task's curvature, evaluation) take minutes; MiniLM's first 3 layers
# take about half an hour there (a GPU is advised: --ranker transformer).
# The CNN starts from the encoder's word-piece embeddings and trains 8 epochs
# (seconds a task here): of 2, 4 and 8 epochs, random or encoder start, 3 seeds,
# that had the best mean dev top-1 on both demo tasks (ICD-10-CM 0.168, HPO
# 0.268, against 0.123 and 0.189 for the 2 random-start epochs before;
# bench/cnn_embedding_init.py, results/clinical/demo_cnn/).
RANKERS = {
    "cnn": {"kind": "cnn", "embedding_init": "encoder"},
    # 32 tokens fit a mention and a concept name (these tasks have no context)
    # at half the cost of the default 64.
    "transformer": {"kind": "transformer", "max_length": 32},
}
DEFAULT_LR = {"cnn": 1e-3, "transformer": 3e-4}
DEFAULT_EPOCHS = 8


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
        mention = EXAMPLE["mention"]
        query = {**EXAMPLE, "top_k": 3}
        status, answer = api.call("POST", "/v1/link", json=query)
        if status != 200:
            raise DemoError(f"POST /v1/link: HTTP {status}: {detail(answer)}")
        top = answer["results"][0] if answer.get("results") else None
        served = answer.get("model_version") or {}
        conf = answer.get("confidence")
        say(
            f"[5/5] /v1/link answers with version {served.get('number')}: "
            f"{mention!r} -> {top and top['id']} {top and top['name']!r}"
            + (f" (confidence {conf:.2f})" if isinstance(conf, int | float) else "")
        )
        curl_body = json.dumps(query).replace("'", "'\\''")
        say("")
        say(
            f"  dashboard   {api.base}/dashboard   (admin token for rollbacks: {show_path(args.dir / 'admin-token')})"
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
        api.close()
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
    p.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help="per task (default: %(default)s)"
    )
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
    p.add_argument("--port", type=port_number, default=8000, help="default: %(default)s")
    p.add_argument(
        "--start-timeout", type=float, default=120.0, help="seconds for the service to answer"
    )
    p.add_argument("--exit", action="store_true", help="stop the service when done")
    p.set_defaults(func=run)
