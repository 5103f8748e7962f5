"""Runs side by side: ``workers`` processes walk the same protocol over the
same results folder (issue 14, item 5).

Nothing is handed out centrally. Each worker walks the protocol as
``run_experiment`` does with one process; the claims (claims.py) make a run
another worker is computing a skip rather than a second computation, and a
cell whose parent model or curvature state is still being computed waits for
a later pass. So dependencies hold by construction: a run starts only from
what is stored. Each record is stored when its run ends, so a killed worker
loses only the run it was in; its claim dies with it, and another worker
runs it again. The calling process is worker 1: it starts at once while the
others import torch (seconds on a busy machine), and it returns only when
nothing is left.

Spawned processes, not forked: CUDA cannot be initialised in a forked child
(pytorch #40403), and on a GPU every worker opens the same device. On CPU
each worker gets ``cores // workers`` threads, so the workers do not
oversubscribe the cores between them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from kronlink.experiments.config import ExperimentConfig
from kronlink.experiments.engine import Event, Results

__all__ = ["default_threads", "run_side_by_side"]


def default_threads(workers: int) -> int:
    """Threads per worker: the cores this process may use, split evenly."""
    return max(1, len(os.sched_getaffinity(0)) // workers)


def _worker(
    cfg: ExperimentConfig,
    options: dict[str, Any],
    end: float | None,
    threads: int,
    conn: Connection,
    keep_freed: bool = False,
) -> None:
    import torch

    from kronlink.experiments.driver import run_experiment

    if keep_freed:
        from kronlink._malloc import keep_freed_memory

        keep_freed = keep_freed_memory()
    torch.set_num_threads(threads)
    conn.send(("event", _started(threads, keep_freed)))
    # The deadline is wall-clock: a spawned worker starts seconds after its parent.
    left = None if end is None else max(0.0, end - time.time())
    res = run_experiment(
        cfg, **options, max_seconds=left, on_event=lambda m: conn.send(("event", m))
    )
    conn.send(("event", f"finished: ran {res.ran}, complete {res.complete}"))
    conn.close()


def _started(threads: int, keep_freed: bool) -> str:
    kept = ", freed memory kept" if keep_freed else ""
    return f"started (pid {os.getpid()}, {threads} thread(s){kept})"


def _forward(
    readers: dict[Connection, tuple[int, Any]], emit: Event, finished: threading.Event
) -> None:
    """Relay the spawned workers' progress lines until every pipe is closed."""
    while readers:
        for conn in wait(list(readers)):
            i, proc = readers[conn]
            try:
                _, message = conn.recv()
            except EOFError:  # the worker ended, or was killed
                del readers[conn]
                proc.join()
                if proc.exitcode != 0 and not finished.is_set():
                    emit(f"w{i}: ended with exit code {proc.exitcode}; its run is left to the rest")
                continue
            emit(f"w{i}: {message}")


def run_side_by_side(
    cfg: ExperimentConfig,
    workers: int,
    *,
    tiers: Sequence[str] | None = None,
    rankers: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    max_seconds: float | None = None,
    on_event: Event | None = None,
    guess_seconds: Mapping[str, float] | None = None,
    threads: int | None = None,
) -> Results:
    """``run_experiment`` with ``workers`` processes: this one (``w1``) and
    ``workers - 1`` spawned ones. This process starts at once, while the
    others import torch, and its walk ends only when nothing is held or left,
    so it also runs whatever a worker that died left. ``ran``: the runs stored
    during the call, counted from the store (a killed worker reports nothing)."""
    import torch

    from kronlink._malloc import kept
    from kronlink.experiments.driver import _Protocol

    walk: dict[str, Any] = {"tiers": tiers, "rankers": rankers, "seeds": seeds}
    before = _Protocol(cfg, execute=False, **walk)
    before.run()
    emit = on_event or (lambda _m: None)
    end = None if max_seconds is None else time.time() + max_seconds
    per_worker = threads or default_threads(workers)
    ctx = mp.get_context("spawn")
    # A worker whose parent is gone fails its next report (a broken pipe) and
    # ends, rather than running on unseen.
    readers: dict[Connection, tuple[int, Any]] = {}  # the relay thread's from here on
    procs = []
    for i in range(2, workers + 1):
        # One pipe per worker, not a shared queue: a worker killed while
        # writing to a shared queue can leave its lock held for the others.
        recv, send = ctx.Pipe(duplex=False)
        options = {**walk, "guess_seconds": guess_seconds}
        proc = ctx.Process(
            # mallopt is per process and a spawned child starts afresh: the
            # workers keep freed memory exactly when this process does.
            target=_worker,
            args=(cfg, options, end, per_worker, send, kept()),
            name=f"kronlink-w{i}",
        )
        proc.start()
        send.close()
        readers[recv] = (i, proc)
        procs.append(proc)
    finished = threading.Event()
    relay = threading.Thread(target=_forward, args=(readers, emit, finished), daemon=True)
    relay.start()
    own = torch.get_num_threads()
    torch.set_num_threads(per_worker)
    try:
        emit(f"w1: {_started(per_worker, kept())}")
        proto = _Protocol(
            cfg,
            execute=True,
            deadline=None if end is None else time.monotonic() + (end - time.time()),
            on_event=lambda m: emit(f"w1: {m}"),
            guess_seconds=guess_seconds,
            **walk,
        )
        res = proto.run()
        if res.complete:
            # Everything is stored and nothing was held in the last pass, so
            # no worker is inside a run: one still importing torch can go.
            finished.set()
            for proc in procs:
                proc.terminate()
    except BaseException:
        for proc in procs:
            proc.terminate()  # their runs are stored or lost whole: rerun to go on
        raise
    finally:
        torch.set_num_threads(own)
        relay.join()  # the others end once they find nothing left
    res.reused = len(before.found)
    now = {r for r in proto.found | proto.ran_here if not r.startswith("state ")}
    res.ran = len(now - before.found)
    return res
