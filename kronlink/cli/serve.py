"""``kronlink serve``: the HTTP service (uvicorn), and ``kronlink up``: service and worker.

The service lives in the top-level ``service`` package, which the library
never imports at module level: these commands import it (or start it as a
child process) only when they run.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from kronlink.cli._common import port_number


def _ensure_admin_token() -> None:
    """Development without KRONLINK_ADMIN_TOKEN: a generated token, kept in
    ``<data dir>/admin-token`` (mode 600) and reused by later runs, so the
    admin routes are usable but never open. Only the file's path is printed:
    logs are collected and kept where a token must not be. Production refuses
    to start without a token (Settings)."""
    from kronlink.settings import get_settings

    settings = get_settings()
    if settings.admin_token is None and settings.environment == "development":
        path = settings.data_path / "admin-token"
        if path.is_file() and path.read_text().strip():
            token = path.read_text().strip()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            token = secrets.token_urlsafe(24)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
        os.environ["KRONLINK_ADMIN_TOKEN"] = token
        get_settings.cache_clear()
        print(
            f"kronlink: no KRONLINK_ADMIN_TOKEN set; the admin token is in {path}",
            file=sys.stderr,
        )


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kronlink.settings import get_settings

    # The service configures its own process's logging (service.app:app_from_env,
    # in each server process): this command starts it by name and never imports
    # it (the import-linter contract in pyproject.toml).
    os.environ["KRONLINK_LOG_LEVEL"] = args.log_level.upper()
    get_settings.cache_clear()
    _ensure_admin_token()
    settings = get_settings()
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    where = settings.redacted()
    print(
        f"kronlink serve: http://{host}:{port} (lineages {settings.lineages}; "
        f"database {where['database']}; artifacts {where['artifacts']})",
        file=sys.stderr,
    )
    prom_dir = None
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several processes: each writes its metrics to files here and /metrics,
        # whichever process answers, sums them all (service/metrics.py). Set before
        # the workers start, as prometheus_client reads it at import.
        prom_dir = tempfile.mkdtemp(prefix="kronlink-prometheus-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = prom_dir
    try:
        _run_uvicorn(uvicorn, host, port, args.workers)
    finally:
        if prom_dir is not None:
            shutil.rmtree(prom_dir, ignore_errors=True)
    return 0


def _run_uvicorn(uvicorn: Any, host: str, port: int, workers: int) -> None:
    uvicorn.run(
        "service.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        # header-size limit, body timeout, problem JSON for unparseable requests
        http="service.server:HttpProtocol",
        log_config=None,  # the app configures logging (JSON, with request ids)
        access_log=False,  # the app logs each request itself, with its id
        lifespan="on",
        timeout_graceful_shutdown=10,
    )


def _stop(procs: list[subprocess.Popen], grace_s: float = 15.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()  # a job left running is recovered by its lease
            p.wait()


def run_up(args: argparse.Namespace) -> int:
    from kronlink.registry import upgrade
    from kronlink.settings import get_settings

    _ensure_admin_token()
    settings = get_settings()
    settings.data_path.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database)  # the embedded default starts from nothing
    me = [sys.executable, "-m", "kronlink.cli"]
    serve = [*me, "serve", "--log-level", args.log_level]
    if args.host:
        serve += ["--host", args.host]
    if args.port is not None:
        serve += ["--port", str(args.port)]
    commands = {"worker": [*me, "worker", "--loglevel", args.log_level.upper()], "service": serve}
    procs: list[subprocess.Popen] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # own sessions: a terminal's Ctrl-C reaches this process only, which
        # then stops both children in order (never one left behind)
        for name, argv in commands.items():
            procs.append(subprocess.Popen(argv, start_new_session=True))
            print(f"kronlink up: {name} started (pid {procs[-1].pid})", file=sys.stderr)
        while not stopping:
            for name, p in zip(commands, procs, strict=True):
                if p.poll() is not None:
                    print(f"kronlink up: {name} exited with {p.returncode}", file=sys.stderr)
                    stopping = True
            time.sleep(0.2)
    finally:
        print("kronlink up: stopping", file=sys.stderr)
        _stop(procs)
        for s, h in previous.items():
            signal.signal(s, h)
    failed = [p.returncode for p in procs if p.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name, func, helptext in (
        ("serve", run_serve, "start the HTTP service (uvicorn)"),
        ("up", run_up, "start the service and a worker together (embedded default)"),
    ):
        p = sub.add_parser(
            name,
            help=helptext,
            description="Settings come from KRONLINK_* variables (docs/service.md).",
        )
        p.add_argument("--host", help="default: KRONLINK_HOST (127.0.0.1)")
        p.add_argument("--port", type=port_number, help="default: KRONLINK_PORT (8000)")
        p.add_argument("--log-level", default="info", help="default: %(default)s")
        if name == "serve":
            p.add_argument(
                "--workers", type=int, default=1, help="server processes (default: %(default)s)"
            )
        p.set_defaults(func=func)
