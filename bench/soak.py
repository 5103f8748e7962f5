"""Soak: two API replicas and one Celery worker on PostgreSQL and Redis, under
/v1/link load without pause, while update jobs swap the served model.

    python bench/soak.py --duration 240 --clients 8          # the full run (CNN)
    python bench/soak.py --short --json soak.json            # CI form (tiny CNN, ~1-2 min)
    python bench/soak.py --model transformer --duration 300  # 3 MiniLM layers (slow on CPU)

One run:

1. creates a fresh PostgreSQL database (``kronlink_soak_<hex>``, dropped at
   the end) and uses the shared Redis on a queue and worker name of its own
   (``kronlink.soak<hex>``; its keys are deleted at the end); Celery results go
   to the run's database, so nothing else of the run stays in Redis;
2. starts ``kronlink worker`` and two ``kronlink serve`` replicas on free
   ports (``KRONLINK_ENVIRONMENT=production``; same registry, artifact and
   staging folders);
3. bootstraps version 1 through ``POST /v1/jobs`` (method none);
4. starts C clients that send /v1/link to the two replicas in turn, without
   pause, and after a warm-up reads every process's RSS;
5. submits three update jobs (KFC, λ = 10) through ``POST /v1/jobs``,
   alternating replicas; the second is cancelled through
   ``DELETE /v1/jobs/{id}`` while it trains (``--cancel-when queued``: right
   after it is submitted); once the others are done and both replicas serve
   the newest version, rolls back to its parent through
   ``POST /v1/versions/{id}/activate``; waits until both replicas serve it;
6. keeps the load on until ``--duration`` has passed (at least ``--tail`` s
   after the rollback), reads RSS again and stops everything.

It prints (and with ``--json`` writes) requests served and failed (with each
failure's reason), p50/p99 latency overall and per replica, the versions each
replica answered with in order against the registry's activation order (the
audit log), RSS of each process at start and end with the growth against the
bound, the jobs' outcomes, jobs left open and files left in staging; the exit
status is 0 only when every check passes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _soak_parts import (
    REPO,
    Replica,
    RssSampler,
    around_swaps,
    client,
    latency_summary,
    spawn,
    stop,
    tail,
    wait_http,
)
from _soak_report import evaluate, print_report, registry_facts
from _soak_scenario import FINISHED, LINEAGE, Api, Scenario
from link import free_port

PG_ADMIN = os.environ.get(
    "KRONLINK_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
RANKERS = {
    ("cnn", False): {"kind": "cnn"},  # all-MiniLM-L6-v2's word pieces, 128-wide
    ("cnn", True): {"kind": "cnn", "tokenizer": None, "embedding_dim": 8, "channels": 8},
    ("transformer", False): {
        "kind": "transformer",
        "num_layers": 3,
        "max_length": 32,
        "max_name_length": 12,
    },
    ("transformer", True): {"kind": "transformer", "encoder": None},
}


def settings_env(work: Path, pg_url: str, redis_url: str, tag: str, token: str) -> dict:
    return {
        **os.environ,
        "KRONLINK_ENVIRONMENT": "production",
        "KRONLINK_DATA_DIR": str(work / "data"),
        "KRONLINK_DATABASE_URL": pg_url,
        "KRONLINK_BROKER_URL": redis_url,
        "KRONLINK_RESULT_BACKEND": "db+" + pg_url,
        "KRONLINK_QUEUE": f"kronlink.{tag}",
        "KRONLINK_ADMIN_TOKEN": token,
        "KRONLINK_LINEAGES": LINEAGE,
        "KRONLINK_LOG_FORMAT": "text",
        "KRONLINK_MODEL_POLL_S": "0.5",
        # heartbeats every 3 s: a cancel reaches a running job within that
        "KRONLINK_LEASE_S": "12",
        "KRONLINK_RETRY_DELAY_S": "1",
        "KRONLINK_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",  # the worker's torch too: 2 cores hold 3 servers
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Start the deployment, run the load and the scenario, return the raw report."""
    import redis
    from sqlalchemy import create_engine, text

    tag = f"soak{uuid.uuid4().hex[:10]}"
    admin = create_engine(args.pg_admin_url, isolation_level="AUTOCOMMIT")
    db_name = f"kronlink_soak_{tag[4:]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db_name}"'))
    pg_url = admin.url.set(database=db_name).render_as_string(hide_password=False)
    redis_url = f"{args.redis_url.rstrip('/')}/{args.redis_db}"
    token = secrets.token_urlsafe(24)
    env = settings_env(work, pg_url, redis_url, tag, token)
    logs = work / "logs"
    logs.mkdir(parents=True)
    procs: dict[str, Any] = {}
    report: dict[str, Any] = {"deployment": {"database": db_name, "redis": redis_url}}
    try:
        from kronlink.registry import upgrade

        upgrade(pg_url)
        procs["worker"] = spawn(
            ["worker", "--loglevel", "WARNING", "--hostname", f"{tag}@%h"], env, logs / "worker.log"
        )
        ports = {"replica-a": free_port(), "replica-b": free_port()}
        for name, port in ports.items():
            procs[name] = spawn(
                ["serve", "--port", str(port), "--log-level", "warning"], env, logs / f"{name}.log"
            )
        for name, port in ports.items():
            wait_http(port, "/healthz", procs[name], logs / f"{name}.log", 120)
        apis = [Api(f"http://127.0.0.1:{p}", token) for p in ports.values()]
        scenario = Scenario(args, apis, work)
        report["deployment"] |= {
            "queue": env["KRONLINK_QUEUE"],
            "pids": {n: p.pid for n, p in procs.items()},
            "ports": ports,
        }
        scenario.bootstrap()
        replicas = scenario.replicas = [Replica(name, port) for name, port in ports.items()]
        report |= asyncio.run(run_load(args, scenario, replicas, procs))
        report["alive_at_end"] = {n: p.poll() is None for n, p in procs.items()}
        report["exit_codes"] = {
            n: p.returncode for n, p in procs.items() if p.returncode is not None
        }
        try:
            report |= after_load(scenario, work, pg_url)
        except Exception as exc:  # the load's numbers are still reported
            report["facts_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for api in locals().get("apis", []):
            api.close()
        stop(list(procs.values()))
        report["log_errors"] = {
            n: sum(
                ("Traceback" in line or " ERROR" in line)
                for line in tail(logs / f"{n}.log", 10**7).splitlines()
            )
            for n in procs
        }
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        admin.dispose()
        r = redis.Redis.from_url(redis_url)
        for key in r.scan_iter(match=f"*{tag}*"):  # the queue, its binding, the worker's pidbox
            r.delete(key)
        for key in r.scan_iter(match="_kombu.binding.*"):
            if r.type(key) == b"set":
                for member in r.smembers(key):
                    if tag.encode() in member:
                        r.srem(key, member)
        r.close()
    return report


def after_load(scenario: Scenario, work: Path, pg_url: str) -> dict[str, Any]:
    """What the registry, the API and the folders hold once the load has stopped."""
    report: dict[str, Any] = {"registry": registry_facts(pg_url)}
    report["jobs"] = {
        role: {
            "id": j["id"],
            "task": scenario.roles[role],
            "state": j["state"],
            "error": j["error"],
            "version_id": j["version_id"],
            "seconds": _seconds(j),
        }
        for role, j in ((r, scenario.refresh(r)) for r in scenario.jobs)
    }
    report["cancelled_in"] = scenario.cancelled_in
    report["jobs_open"] = [
        {"id": j["id"], "state": j["state"]}
        for j in scenario.get(f"/v1/jobs?lineage={LINEAGE}")
        if j["state"] not in FINISHED
    ]
    report["events"] = scenario.events
    staging = work / "data" / "staging"
    report["staging_left"] = sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []
    cancelled = report["jobs"].get("cancelled", {}).get("id")
    arts = work / "data" / "artifacts"
    report["cancelled_artifacts"] = sorted(
        str(p.relative_to(arts)) for p in arts.rglob(f"j{cancelled}-*") if cancelled
    )
    return report


def _seconds(job: dict) -> float | None:
    from datetime import datetime

    if not (job.get("created_at") and job.get("finished_at")):
        return None
    t = [datetime.fromisoformat(job[k]) for k in ("created_at", "finished_at")]
    return round((t[1] - t[0]).total_seconds(), 1)


async def run_load(
    args: argparse.Namespace, scenario: Scenario, replicas: list[Replica], procs: dict
) -> dict[str, Any]:
    t0 = time.perf_counter()
    stop_load = asyncio.Event()
    sampler = RssSampler({n: p.pid for n, p in procs.items()})
    # times in the report (events, versions served, RSS) count from the run's start
    sampling = asyncio.create_task(sampler.run(scenario.t0))
    clients = [
        asyncio.create_task(client(i, replicas, stop_load, scenario.t0, args.candidates))
        for i in range(args.clients)
    ]
    scenario.say(f"load: {args.clients} clients on {len(replicas)} replicas")
    await asyncio.sleep(args.warmup)
    rss_start = sampler.sample()
    error = None
    try:
        await asyncio.to_thread(scenario.run)
    except Exception as exc:  # reported, and the load still ends cleanly
        error = f"{type(exc).__name__}: {exc}"
        scenario.say(f"scenario failed: {error}")
    rss_settled = sampler.sample()  # the rollback is served: no swap from here on
    done_at = time.perf_counter() - t0
    await asyncio.sleep(max(args.tail, args.duration - done_at))
    rss_end = sampler.sample()
    stop_load.set()
    await asyncio.gather(*clients)
    load_s = time.perf_counter() - t0
    sampler.close()
    await sampling
    return {
        "scenario_error": error,
        "load_seconds": round(load_s, 1),
        "replicas": {
            r.name: {
                "served": len(r.latencies),
                "failed": sum(r.failures.values()),
                "failure_reasons": dict(r.failures),
                **latency_summary(r.latencies),
                "latency_around_swaps": around_swaps(r),
                "versions_served": [
                    {"number": n, "version_id": v, "from_s": a, "to_s": b, "answers": c}
                    for n, v, a, b, c in r.runs
                ],
            }
            for r in replicas
        },
        "all": {
            "served": sum(len(r.latencies) for r in replicas),
            "failed": sum(sum(r.failures.values()) for r in replicas),
            "requests_per_s": round(sum(len(r.latencies) for r in replicas) / load_s, 1),
            **latency_summary([x for r in replicas for x in r.latencies]),
        },
        "memory": {
            name: {
                "pid": procs[name].pid,
                "start_mib": round(rss_start[name], 1),
                "end_mib": round(rss_end[name], 1),
                "peak_mib": round(sampler.peak[name], 1),
                "growth_mib": round(rss_end[name] - rss_start[name], 1),
                "growth_pct": round(100 * (rss_end[name] / rss_start[name] - 1), 1),
                "after_swaps_mib": round(rss_settled[name], 1),
                "steady_growth_mib": round(rss_end[name] - rss_settled[name], 1),
            }
            for name in procs
        },
        "rss_timeline": sampler.timeline[:: max(1, len(sampler.timeline) // 60)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--duration", type=float, help="seconds of load at least (default 240; --short 20)"
    )
    p.add_argument("--clients", type=int, help="concurrent clients (default 8; --short 4)")
    p.add_argument("--model", choices=["cnn", "transformer"], default="cnn")
    p.add_argument("--short", action="store_true", help="the CI form: tiny model and tasks, 20 s")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--cancel-when", choices=["running", "queued"], default="running")
    p.add_argument("--candidates", type=int, default=10, help="per /v1/link query")
    p.add_argument("--train-queries", type=int, help="per update task (default 800; --short 16)")
    p.add_argument("--epochs", type=int, help="per job (default 2; --short 1)")
    p.add_argument(
        "--rss-bound-mib",
        type=float,
        default=128.0,
        help="allowed RSS growth start to end per process: the larger of this ...",
    )
    p.add_argument("--rss-bound-pct", type=float, default=25.0, help="... and this %% of the start")
    p.add_argument(
        "--rss-steady-mib",
        type=float,
        default=16.0,
        help="allowed RSS growth per process from the rollback being served to the end",
    )
    p.add_argument("--pg-admin-url", default=PG_ADMIN, help="a database to CREATE DATABASE from")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    p.add_argument("--redis-db", type=int, default=random.randint(1, 15))
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, artifacts)")
    args = p.parse_args(argv)
    short = args.short
    args.duration = args.duration if args.duration is not None else (20.0 if short else 240.0)
    args.clients = args.clients or (4 if short else 8)
    n = args.train_queries or (16 if short else 800)
    args.sizes, args.k = (n, max(8, n // 5), max(8, n // 5)), 4 if short else 8
    args.ranker = RANKERS[(args.model, short)]
    lr = 3e-3 if short else (1e-3 if args.model == "cnn" else 3e-4)
    args.train = {
        "epochs": args.epochs or (1 if short else 2),
        "batch_size": 16,
        "lr": lr,
        "seed": 0,
    }
    args.warmup, args.tail = (2.0, 3.0) if short else (5.0, 10.0)
    args.job_timeout = 180.0 if short else 1200.0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(tempfile.mkdtemp(prefix="kronlink-soak-"))
    try:
        report = measure(args, work)
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["checks"] = evaluate(report, args)
    report["bounds"] = {
        "rss_bound_mib": args.rss_bound_mib,
        "rss_bound_pct": args.rss_bound_pct,
        "rss_steady_mib": args.rss_steady_mib,
    }
    report["config"] = {
        "model": args.model,
        "short": short,
        "clients": args.clients,
        "duration_s": args.duration,
        "ranker": args.ranker,
        "train": args.train,
        "task_sizes": args.sizes,
        "cancel_when": args.cancel_when,
        "cpus": os.cpu_count(),
    }
    print_report(report, args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
