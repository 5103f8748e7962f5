"""``kronlink worker``: start the Celery worker that runs update jobs.

One process per GPU: ``--pool solo``, concurrency 1, so CUDA is initialised
in the process that trains and never forked. Set ``CUDA_VISIBLE_DEVICES`` per
worker. The worker lives in the top-level ``worker`` package, which the
library never imports: this command replaces itself with
``python -m celery -A worker.app worker ...``.
"""

from __future__ import annotations

import argparse
import os
import sys


def celery_argv(args: argparse.Namespace) -> list[str]:
    from kronlink.settings import get_settings

    settings = get_settings()
    queues = args.queues or settings.queue
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "worker",
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "-Q",
        queues,
        "--loglevel",
        args.loglevel,
        "--statedb",
        str(settings.data_path / "worker.state"),
        "-E",
    ]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    return argv


def run(args: argparse.Namespace) -> int:
    from kronlink.settings import get_settings

    settings = get_settings()
    settings.data_path.mkdir(parents=True, exist_ok=True)
    where = settings.redacted()
    print("kronlink worker: listening on", file=sys.stderr)
    for key in ("broker", "queue", "database", "result_backend", "artifacts", "staging"):
        print(
            f"  {key:15} {where[key] if key != 'queue' else args.queues or where[key]}",
            file=sys.stderr,
        )
    sys.stderr.flush()
    argv = celery_argv(args)
    if args.dry_run:
        print(" ".join(argv))
        return 0
    os.execv(argv[0], argv)
    return 0  # pragma: no cover (execv does not return)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="start the update worker (Celery, --pool solo, one per GPU)",
        description="Settings come from KRONLINK_* variables (docs/worker.md).",
    )
    p.add_argument("--queues", help="comma-separated queues (default: KRONLINK_QUEUE)")
    p.add_argument("--hostname", help="Celery node name (default: celery@<host>)")
    p.add_argument("--loglevel", default="INFO", help="default: %(default)s")
    p.add_argument("--dry-run", action="store_true", help="print the celery command and exit")
    p.set_defaults(func=run)
