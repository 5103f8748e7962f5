"""CPU a /v1/link request costs the app, without the model: the lean path against the route.

    python bench/link_overhead.py --json results/bench/link-overhead.json

The app (create_app, its lifespan, the batcher and its model thread) is
driven over ASGI directly by C concurrent tasks in this process, with the
model call replaced by one that returns 10 ranked results at once: what is
left is the request path (middleware, parsing, validation, the batcher's
queue and thread hop, encoding). Not in it: uvicorn's HTTP parsing and the
socket, which bench/link.py measures end to end. CPU time is the process's,
so the figure holds on a loaded machine better than a rate does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from link import ADMIN, query, register


def _scope(body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/link",
        "raw_path": b"/v1/link",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


async def _one(app: Any, body: bytes) -> None:
    sent: list[dict[str, Any]] = []
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(_scope(body), receive, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"{sent[0]['status']}: {sent[-1].get('body', b'')[:300]!r}")


async def _measure(app: Any, bodies: list[bytes], seconds: float) -> tuple[float, float]:
    """(requests/s, CPU ms a request) with one task a body, each sending one at a time."""
    done = [0]

    async def client(body: bytes, stop: float) -> None:
        while time.perf_counter() < stop:
            await _one(app, body)
            done[0] += 1

    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(b, t0 + seconds) for b in bodies))
    c1, t1 = time.process_time(), time.perf_counter()
    return done[0] / (t1 - t0), (c1 - c0) / done[0] * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=4.0, help="seconds a round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per path, alternating")
    p.add_argument("--json", help="also write the record here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    torch.set_num_threads(1)
    import service.batching as batching
    from kronlink.settings import Settings
    from service import create_app

    ranked = [
        {"id": f"B{j:05d}", "name": "essential hypertension pain", "score": 1.0 / (j + 1)}
        | {"probability": 0.1, "rank": j + 1}
        for j in range(10)
    ]
    # the model call replaced: only the request path is left to measure
    batching.rank_items = lambda model, items, max_size: [list(ranked) for _ in items]

    data = Path(tempfile.mkdtemp(prefix="kronlink-bench-"))
    load_before = os.getloadavg()
    rows: dict[str, list[dict[str, float]]] = {"lean": [], "route": []}
    try:
        register(data, "cnn")
        bodies = [json.dumps(query(i, 10, bm25=True)).encode() for i in range(args.clients)]
        apps = {
            name: create_app(
                Settings(
                    data_dir=data,
                    admin_token=ADMIN,
                    torch_threads=1,
                    log_format="text",
                    link_fast_path=name == "lean",
                )
            )
            for name in rows
        }

        async def run() -> None:
            async with (
                apps["lean"].router.lifespan_context(apps["lean"]),
                apps["route"].router.lifespan_context(apps["route"]),
            ):
                for app in apps.values():  # the ontology index built, the paths warm
                    await _one(app, bodies[0])
                    await _measure(app, bodies, 1.0)
                for _ in range(args.rounds):
                    for name, app in apps.items():
                        rps, cpu = await _measure(app, bodies, args.duration)
                        rows[name].append({"requests_s": rps, "cpu_ms": cpu})
                        print(f"  {name:>5}: {rps:8.0f} requests/s, {cpu:.3f} CPU ms a request")

        asyncio.run(run())
    finally:
        shutil.rmtree(data, ignore_errors=True)

    def median(name: str) -> float:
        xs = sorted(r["cpu_ms"] for r in rows[name])
        return xs[len(xs) // 2]

    lean, route = median("lean"), median("route")
    print(
        f"\n| path | CPU ms a request (median of {args.rounds}) | x lean |\n|---|---:|---:|\n"
        f"| lean (service/fastlink.py) | {lean:.3f} | 1.00 |\n"
        f"| FastAPI route | {route:.3f} | {route / lean:.2f} |"
    )
    if args.json:
        record = {
            "bench": "bench/link_overhead.py",
            "argv": sys.argv[1:] if argv is None else argv,
            "clients": args.clients,
            "duration_s": args.duration,
            "orjson": _has_orjson(),
            "machine": {
                "cpus": os.cpu_count(),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
            },
            "rounds": rows,
            "median_cpu_ms": {"lean": lean, "route": route},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _has_orjson() -> bool:
    try:
        import orjson  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
