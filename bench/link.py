"""Throughput and latency of /v1/link against the same model called in-process.

    python bench/link.py                       # transformer (3-layer MiniLM), 1/8/64 clients
    python bench/link.py --short               # a quick run (CNN, 3 s a point)
    python bench/link.py --model cnn --duration 10 --workers 2

One run registers a version in a fresh embedded registry (SQLite, local
artifacts), starts ``kronlink serve`` as a child process, and measures:

- service, /v1/link: C concurrent keep-alive clients, each sending one query
  (10 candidates, about 32 word pieces a row) and waiting for the answer, for
  ``--duration`` seconds after a warm-up. Queries/s, p50 and p99 latency.
- service, /v1/link/batch: C clients each sending B queries a request.
- in-process (the limit): the served code path (``rank_items``: encode,
  forward, softmax, ranking) on batches of C queries back to back in this
  process, with no HTTP. Queries/s = C / batch time; each query's latency is
  its batch's time.

The clients are httpx.AsyncClient instances (one keep-alive connection
each) in this process; the load generator shares the CPU with the server, so
its cost is part of what the service figures pay. The in-process figures are
measured while the server idles. A 429 (overload) is counted, and the client
waits its Retry-After before the next request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from link_table import cpu_seconds, render

REPO = Path(__file__).resolve().parents[1]
ADMIN = "bench-admin-token-0123456789"
WORDS = (
    "patient presented with acute onset of severe pain radiating to the left arm "
    "history of hypertension and type two diabetes treated with metformin daily"
).split()
NAMES = [
    "essential hypertension",
    "type 2 diabetes mellitus",
    "angina pectoris",
    "acute myocardial infarction",
    "chest pain unspecified",
    "gastroesophageal reflux disease",
    "costochondritis",
    "pulmonary embolism",
    "anxiety disorder",
    "musculoskeletal pain",
    "pericarditis",
    "aortic dissection",
]


ONTOLOGY = "bench"
CONCEPTS = 5000  # in the bench ontology that BM25 candidates come from


def concepts() -> list:
    """A synthetic ontology: every name shares words with the queries' mentions."""
    from kronlink.data.schema import Concept

    return [
        Concept(
            f"B{i:05d}",
            f"{NAMES[i % len(NAMES)]} {WORDS[(7 * i) % len(WORDS)]} {WORDS[(13 * i) % len(WORDS)]}",
        )
        for i in range(CONCEPTS)
    ]


def query(i: int, candidates: int, bm25: bool = False) -> dict:
    """A query of about 32 word pieces a row (left context, mention, right, a name).

    ``bm25``: no candidates; the service generates ``candidates`` of them
    from the registered bench ontology (KRONLINK_BM25_CANDIDATES)."""
    left = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8))
    right = " ".join(WORDS[(i + 3 + k) % len(WORDS)] for k in range(6))
    if bm25:
        return {
            "mention": NAMES[i % len(NAMES)],
            "left_context": left,
            "right_context": right,
            "ontology": ONTOLOGY,
        }
    cands = [
        {"id": f"C{(i + j) % 97}", "name": NAMES[(i + j) % len(NAMES)]} for j in range(candidates)
    ]
    return {
        "mention": "chest pain",
        "left_context": left,
        "right_context": right,
        "candidates": cands,
    }


def build_model(kind: str):
    from kronlink.models import build_ranker

    if kind == "transformer":  # the served default: first 3 layers of all-MiniLM-L6-v2
        return build_ranker("transformer", num_layers=3, max_length=32, max_name_length=12)
    return build_ranker("cnn", max_query_length=32, max_name_length=12)


def register(data: Path, kind: str) -> None:
    """Version 1 of lineage main, as the worker registers one."""
    from kronlink.registry import (
        ArtifactStore,
        activate_version,
        create_engine_from_url,
        create_version,
        lineage_transaction,
        make_session_factory,
        upgrade,
    )
    from kronlink.settings import Settings

    settings = Settings(data_dir=data)
    upgrade(settings.database)
    model = build_model(kind)
    scratch = Path(tempfile.mkdtemp())
    model.save(scratch / "m")
    art = ArtifactStore(settings.artifact_url).put_dir("versions/main/bench", scratch / "m")
    shutil.rmtree(scratch)
    from kronlink.data.io import write_ontology
    from kronlink.registry import create_ontology

    scratch = Path(tempfile.mkdtemp())
    write_ontology(scratch / "ontology.jsonl", concepts())
    onto = ArtifactStore(settings.artifact_url).put_file(
        f"ontologies/{ONTOLOGY}/bench", scratch / "ontology.jsonl"
    )
    shutil.rmtree(scratch)
    engine = create_engine_from_url(settings.database)
    with lineage_transaction(make_session_factory(engine), "main") as s:
        create_ontology(s, ONTOLOGY, concept_count=CONCEPTS, source="bench", artifact=onto)
        v = create_version(s, lineage="main", method="none", artifact=art)
        activate_version(s, v.id, actor="bench")
    engine.dispose()


@dataclass
class Point:
    qps: float
    p50_ms: float
    p99_ms: float
    n: int
    batch: float = 0.0  # service: mean queries per model call
    model_ms: float = 0.0  # service: mean model call (candidates, encode, forward, rank)
    cpu_ms: float = 0.0  # CPU time per query (server processes, or this process)
    rejected: int = 0  # service: 429 answers (overload) during the measured window


def summarize(latencies: list[float], queries: int, seconds: float) -> Point:
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    return Point(queries / seconds, statistics.median(lat) * 1000, p99 * 1000, queries)


def scrape(port: int) -> dict[str, float]:
    """Sums of the batching metrics (the whole run so far)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out = {}
    for line in text.splitlines():
        for key in (
            "kronlink_link_batch_size_sum",
            "kronlink_link_batch_size_count",
            "kronlink_link_batch_seconds_sum",
        ):
            if line.startswith(key + "{"):
                out[key] = float(line.split()[-1])
    return out


# -- in-process ---------------------------------------------------------------
def in_process(
    data: Path, concurrency: int, duration: float, candidates: int, bm25: bool = False
) -> Point:
    from kronlink.registry import ArtifactStore, active_version, create_engine_from_url
    from kronlink.registry import make_session_factory as msf
    from kronlink.settings import Settings
    from service.batching import LinkItem, rank_items
    from service.holder import load_version

    settings = Settings(data_dir=data)
    engine = create_engine_from_url(settings.database)
    with msf(engine).begin() as s:
        version = active_version(s, "main")
    engine.dispose()
    model = load_version(ArtifactStore(settings.artifact_url), version, "cpu")
    from kronlink.data.candidates import CandidateIndex
    from kronlink.data.schema import Candidate
    from kronlink.registry import get_ontology
    from service.ontologies import OntologyIndex

    index = None
    if bm25:  # the index the service builds for the ontology (service/ontologies.py)
        cs = concepts()
        engine = create_engine_from_url(settings.database)
        with msf(engine).begin() as s:
            info = get_ontology(s, ONTOLOGY)
        engine.dispose()
        index = OntologyIndex(info, CandidateIndex(cs), {c.id: c for c in cs})
    items = []
    for i in range(concurrency):
        q = query(i, candidates, bm25)
        given = None if bm25 else tuple(Candidate(c["id"], c["name"]) for c in q["candidates"])
        items.append(
            LinkItem(
                mention=q["mention"],
                left_context=q["left_context"],
                right_context=q["right_context"],
                candidates=given,
                index=index,
                k=candidates,
            )
        )
    rank_items(model, items, 64)  # warm-up
    lat, done, t0, c0 = [], 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < duration:
        b0 = time.perf_counter()
        rank_items(model, items, 64)
        lat += [time.perf_counter() - b0] * concurrency
        done += concurrency
    point = summarize(lat, done, time.perf_counter() - t0)
    point.cpu_ms = (time.process_time() - c0) / done * 1000
    return point


# -- the service ----------------------------------------------------------------
async def _client(
    port: int,
    path: str,
    body: bytes,
    per_request: int,
    stop_at: float,
    warm_until: float,
    lat: list[float],
    counts: list[int],
    statuses: dict[int, int],
) -> None:
    """One keep-alive client sending one request at a time; a 429 is counted, not fatal."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60
    ) as client:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            r = await client.post(path, content=body, headers=headers)
            t1 = time.perf_counter()
            if r.status_code not in (200, 429):
                raise RuntimeError(f"{path}: {r.status_code} {r.text[:300]!r}")
            if t0 >= warm_until:
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    lat.append(t1 - t0)
                    counts[0] += per_request
            if r.status_code == 429:
                # as a well-behaved client would: wait what the server asks
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))


async def _load(
    port: int, path: str, bodies: list[bytes], per_request: int, warmup: float, duration: float
) -> Point:
    lat: list[float] = []
    counts = [0]
    statuses: dict[int, int] = {}
    now = time.perf_counter()
    warm_until, stop_at = now + warmup, now + warmup + duration
    await asyncio.gather(
        *(
            _client(port, path, b, per_request, stop_at, warm_until, lat, counts, statuses)
            for b in bodies
        )
    )
    point = summarize(lat, counts[0], duration)
    point.rejected = statuses.get(429, 0)
    return point


def service_point(
    server: subprocess.Popen,
    port: int,
    concurrency: int,
    duration: float,
    warmup: float,
    candidates: int,
    batch: int = 0,
    bm25: bool = False,
) -> Point:
    if batch:
        bodies = [
            json.dumps(
                {"items": [query(c * batch + i, candidates, bm25) for i in range(batch)]}
            ).encode()
            for c in range(concurrency)
        ]
        path, per = "/v1/link/batch", batch
    else:
        bodies = [json.dumps(query(i, candidates, bm25)).encode() for i in range(concurrency)]
        path, per = "/v1/link", 1
    before, cpu0 = scrape(port), cpu_seconds(server.pid)
    point = asyncio.run(_load(port, path, bodies, per, warmup, duration))
    after, cpu1 = scrape(port), cpu_seconds(server.pid)
    calls = after["kronlink_link_batch_size_count"] - before.get(
        "kronlink_link_batch_size_count", 0
    )
    queries = after.get("kronlink_link_batch_size_sum", 0) - before.get(
        "kronlink_link_batch_size_sum", 0
    )
    # with --workers N each process has its own metrics: these describe whichever answered
    model_s = after.get("kronlink_link_batch_seconds_sum", 0) - before.get(
        "kronlink_link_batch_seconds_sum", 0
    )
    point.batch = queries / max(calls, 1)
    point.model_ms = model_s / max(calls, 1) * 1000
    point.cpu_ms = (cpu1 - cpu0) / max(queries, 1) * 1000  # warm-up included on both sides
    return point


def start_server(
    data: Path, port: int, workers: int, env_extra: dict[str, str]
) -> subprocess.Popen:
    env = {
        **os.environ,
        "KRONLINK_DATA_DIR": str(data),
        "KRONLINK_ADMIN_TOKEN": ADMIN,
        "KRONLINK_LOG_FORMAT": "text",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        **env_extra,
    }
    cmd = [
        sys.executable,
        "-m",
        "kronlink.cli",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--workers",
        str(workers),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server not ready after 120 s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=["transformer", "cnn"], default="transformer")
    p.add_argument("--concurrency", default="1,8,64", help="clients (and in-process batch sizes)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured a point")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument(
        "--candidates-from",
        choices=["bm25", "given"],
        default="bm25",
        help="bm25: requests name the bench ontology and the service generates the "
        "candidates (in-process too); given: each request carries them",
    )
    p.add_argument("--batch-items", type=int, default=64, help="queries a /v1/link/batch request")
    p.add_argument("--no-batch-route", action="store_true", help="measure /v1/link only")
    p.add_argument("--workers", type=int, default=1, help="server processes")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, in-process and per server process (KRONLINK_TORCH_THREADS)",
    )
    p.add_argument("--batch-wait-ms", type=float, help="KRONLINK_BATCH_MAX_WAIT_MS for the server")
    p.add_argument("--queue-max-ms", type=float, help="KRONLINK_BATCH_QUEUE_MAX_MS for the server")
    p.add_argument("--short", action="store_true", help="CNN, 1 and 8 clients, 3 s a point")
    p.add_argument("--json", help="also write the record here (bench/link_table.py reads it)")
    args = p.parse_args(argv)
    if args.short:
        args.model, args.concurrency, args.duration, args.warmup = "cnn", "1,8", 3.0, 1.0
    levels = [int(c) for c in args.concurrency.split(",")]
    bm25 = args.candidates_from == "bm25"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    torch.set_num_threads(args.threads)
    data = Path(tempfile.mkdtemp(prefix="kronlink-bench-"))
    rows = []
    load_before = os.getloadavg()
    started = time.time()
    try:
        register(data, args.model)
        port = free_port()
        extra = {
            "KRONLINK_TORCH_THREADS": str(args.threads),
            "KRONLINK_BM25_CANDIDATES": str(args.candidates),
        }
        if args.batch_wait_ms is not None:
            extra["KRONLINK_BATCH_MAX_WAIT_MS"] = str(args.batch_wait_ms)
        if args.queue_max_ms is not None:
            extra["KRONLINK_BATCH_QUEUE_MAX_MS"] = str(args.queue_max_ms)
        server = start_server(data, port, args.workers, extra)
        try:
            for c in levels:
                svc = service_point(
                    server, port, c, args.duration, args.warmup, args.candidates, bm25=bm25
                )
                ref = in_process(data, c, args.duration, args.candidates, bm25)
                rows.append(("/v1/link", c, 1, svc, ref))
                print(
                    f"  {c:>3} clients: service {svc.qps:8.1f} q/s, in-process {ref.qps:8.1f} q/s"
                    f", 429s {svc.rejected}",
                    file=sys.stderr,
                    flush=True,
                )
            b = args.batch_items
            for c in [] if args.no_batch_route else sorted({1, min(levels[-1], 2)}):
                svc = service_point(
                    server, port, c, args.duration, args.warmup, args.candidates, b, bm25
                )
                ref = in_process(data, b, args.duration, args.candidates, bm25)
                rows.append(("/v1/link/batch", c, b, svc, ref))
                print(
                    f"  batch {c} x {b}: service {svc.qps:8.1f} q/s, in-process {ref.qps:8.1f} q/s",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            server.terminate()
            server.wait(timeout=30)
    finally:
        shutil.rmtree(data, ignore_errors=True)

    record = {
        "bench": "bench/link.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "model": args.model,
        "candidates": args.candidates,
        "candidates_from": args.candidates_from,
        "workers": args.workers,
        "threads": args.threads,
        "duration_s": args.duration,
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "started_unix": started,
        "rows": [
            {
                "route": r,
                "clients": c,
                "per_request": per,
                "service": vars(sv),
                "in_process": vars(ip),
            }
            for r, c, per, sv, ip in rows
        ],
    }
    print(render([record]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
