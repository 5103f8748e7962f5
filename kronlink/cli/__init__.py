"""The ``kronlink`` command line.

This package is the one place in the library that prints and draws progress
bars; library functions report progress through callbacks. Each command is a
module with ``add_parser(sub)`` and ``run(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from kronlink.cli import (
    db,
    demo,
    evaluate,
    experiment,
    fisher,
    omega,
    report,
    serve,
    submit,
    tasks,
    train,
    update,
    worker,
)
from kronlink.errors import KronlinkError

__all__ = ["build_parser", "main"]

COMMANDS = (tasks, train, evaluate, fisher, db, update, worker, submit, serve, demo)
COMMANDS += (experiment, report, omega)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kronlink",
        description="Medical entity linking that learns new ontologies without forgetting.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def _quiet_bm25s(record: logging.LogRecord) -> bool:
    return not (record.name.startswith("bm25s") and record.levelno < logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # bm25s sets its own logger to DEBUG when imported (lazily, later than
        # this), so a level set here would be overwritten: filter instead.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_bm25s)
        # httpx logs every request at INFO: the demo's progress polling would
        # bury its own output under one line per poll.
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except KronlinkError as exc:
        print(f"kronlink {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
