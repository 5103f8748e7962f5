"""Parts of bench/soak.py: the deployment's processes, the load clients, RSS.

The load clients are httpx async clients in one process, one connection kept
open per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from link import NAMES, query
from link_table import tree_pids

from kronlink.data.schema import Candidate, Concept, Query, Task

REPO = Path(__file__).resolve().parents[1]

CONCEPT_NAMES = [
    *NAMES,  # bench/link.py's, and a few more so BM25 has some to choose from
    "type 1 diabetes mellitus",
    "asthma",
    "migraine",
    "fever",
    "iron deficiency anemia",
    "gout",
    "atrial fibrillation",
    "chronic kidney disease",
    "hypothyroidism",
    "community acquired pneumonia",
    "urinary tract infection",
    "major depressive disorder",
]
CONTEXT = "patient seen in clinic with history of symptoms reported on admission today".split()


def make_task(name: str, seed: int, sizes: tuple[int, int, int], k: int) -> Task:
    """A synthetic task: mentions are a gold name with a word dropped or a
    suffix, ``k`` candidates drawn from the concept list (gold among them)."""
    rng = random.Random(seed)
    concepts = tuple(Concept(f"C{i:03d}", n) for i, n in enumerate(CONCEPT_NAMES))
    queries = []
    for split, n in zip(("train", "dev", "test"), sizes, strict=True):
        for _ in range(n):
            picked = rng.sample(concepts, k)
            gold = rng.choice(picked)
            words = gold.name.split()
            if len(words) > 1 and rng.random() < 0.5:
                words.pop(rng.randrange(len(words)))
            left = " ".join(rng.sample(CONTEXT, 4))
            right = " ".join(rng.sample(CONTEXT, 3))
            cands = tuple(Candidate(c.id, c.name) for c in picked)
            queries.append(Query(" ".join(words), gold.id, left, right, cands, split))
    return Task(name, concepts, tuple(queries))


# -- processes ----------------------------------------------------------------
def tree_rss_mib(root: int) -> float:
    """Sum of VmRSS over a process and its children (the Celery worker's pool
    children included, should it have any), in MiB."""
    total_kib = 0
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 1024


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "kronlink.cli", *argv],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C on the soak does not hit them first
        )


def stop(procs: list[subprocess.Popen], grace_s: float = 20.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def wait_http(port: int, path: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}): {tail(log)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"127.0.0.1:{port}{path} not 200 after {timeout_s:g} s: {tail(log)}")


def tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


class RssSampler:
    """Samples every process tree each ``interval_s`` (peak and timeline)."""

    def __init__(self, procs: dict[str, int], interval_s: float = 1.0) -> None:
        self.procs = procs
        self.interval_s = interval_s
        self.peak: dict[str, float] = dict.fromkeys(procs, 0.0)
        self.timeline: list[tuple[float, dict[str, float]]] = []
        self._stop = asyncio.Event()

    def sample(self) -> dict[str, float]:
        now = {name: tree_rss_mib(pid) for name, pid in self.procs.items()}
        for name, mib in now.items():
            self.peak[name] = max(self.peak[name], mib)
        return now

    async def run(self, t0: float) -> None:
        while not self._stop.is_set():
            self.timeline.append((round(time.perf_counter() - t0, 1), self.sample()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    def close(self) -> None:
        self._stop.set()


# -- load ---------------------------------------------------------------------
@dataclass
class Replica:
    name: str
    port: int
    latencies: list[float] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)  # s, beside each latency
    failures: Counter = field(default_factory=Counter)
    # the versions this replica answered with, in the order of the answers:
    # [number, version id, first seen (s), last seen (s), answers]
    runs: list[list] = field(default_factory=list)

    def served(self, number: int, version_id: int, t: float) -> None:
        if self.runs and self.runs[-1][1] == version_id:
            self.runs[-1][3] = t
            self.runs[-1][4] += 1
        else:
            self.runs.append([number, version_id, t, t, 1])


def _reason(status: int, payload: bytes) -> str:
    try:
        body = json.loads(payload)
        return f"HTTP {status} {body.get('type', '')}: {str(body.get('detail', ''))[:120]}"
    except ValueError:
        return f"HTTP {status}: {payload[:120]!r}"


async def client(
    idx: int,
    replicas: list[Replica],
    stop: asyncio.Event,
    t0: float,
    candidates: int,
    timeout_s: float = 30.0,
) -> None:
    """Sends /v1/link to the replicas in turn, without pause, until ``stop``;
    every failure (status, connection error, timeout) is counted with its reason."""
    bodies = [query(idx * 31 + j, candidates) for j in range(16)]
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    conns = [
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{rep.port}", timeout=timeout_s, limits=limits)
        for rep in replicas
    ]
    i = idx
    try:
        while not stop.is_set():
            r = i % len(replicas)
            rep = replicas[r]
            body = bodies[i % len(bodies)]
            i += 1
            start = time.perf_counter()
            try:
                resp = await conns[r].post("/v1/link", json=body)
            except Exception as exc:  # any failure is counted, none ends the client
                rep.failures[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                await asyncio.sleep(0.05)  # a dead replica must not turn this into a busy loop
                continue
            end = time.perf_counter()
            if resp.status_code != 200:
                rep.failures[_reason(resp.status_code, resp.content)] += 1
                continue
            try:
                version = resp.json()["model_version"]
                rep.served(version["number"], version["id"], round(end - t0, 3))
            except (ValueError, KeyError, TypeError) as exc:
                rep.failures[f"bad 200 body ({type(exc).__name__}): {resp.content[:120]!r}"] += 1
                continue
            rep.latencies.append(end - start)
            rep.answered_at.append(end - t0)
    finally:
        for c in conns:
            await c.aclose()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def around_swaps(rep: Replica, window_s: float = 1.0) -> dict[str, dict]:
    """Latency of the answers within ``window_s`` of a change of served
    version on this replica, and of all the others: what a swap adds."""
    swaps = [run[2] for run in rep.runs[1:]]
    near: list[float] = []
    far: list[float] = []
    for t, lat in zip(rep.answered_at, rep.latencies, strict=True):
        (near if any(abs(t - s) <= window_s for s in swaps) else far).append(lat)
    return {
        "near_swaps": {"answers": len(near), **latency_summary(near)},
        "elsewhere": {"answers": len(far), **latency_summary(far)},
    }


def latency_summary(values: list[float]) -> dict[str, float | None]:
    ms = [v * 1000 for v in values]
    return {
        "p50_ms": round(statistics.median(ms), 2) if ms else None,
        "p99_ms": round(percentile(ms, 0.99), 2) if ms else None,
        "max_ms": round(max(ms), 2) if ms else None,
    }
