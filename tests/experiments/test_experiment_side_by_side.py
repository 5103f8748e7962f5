"""Runs side by side (issue 14, item 5): processes sharing one results folder
split the runs, never compute one run or curvature state twice, store the
same numbers as one process does, and a killed process loses only what it
was in the middle of.

The config: tier 1 on three tiny tasks, then tier 2 (none, KFC at two λ) on
(alpha, beta) and (alpha, gamma). Both tier-2 cells start from tier 1's alpha
model and its curvature state: the state two processes would both write."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from experiment_helpers import write_tiny_tasks

from kronlink.errors import ConfigError
from kronlink.experiments import load_config, run_experiment
from kronlink.experiments.claims import Busy, Claims
from kronlink.experiments.store import RunStore

RUNS = 3 + 2 * 3  # tier 1 per task; per tier-2 ordering: none and KFC at 2 λ
REPO = Path(__file__).resolve().parents[2]

CONFIG = """
name = "{name}"
results = "{results}"
seeds = [0]
device = "cpu"

[tasks]
names = ["alpha", "beta", "gamma"]
dirs = {{ alpha = "{tasks}/alpha", beta = "{tasks}/beta", gamma = "{tasks}/gamma" }}

[curvature]
batch_size = 16

[selection]
grid = [0.1, 10.0]

[rankers.cnn]
kind = "cnn"
model = {{ tokenizer = "none", embedding_dim = 8, channels = 8, hidden_size = 8, dropout = 0.0, max_query_length = 24, max_name_length = 12 }}
train = {{ epochs = {epochs}, batch_size = 8, lr = 3e-3, head_lr = 3e-3 }}
tiers = ["tier1", "tier2"]
tier2_orderings = [["alpha", "beta"], ["alpha", "gamma"]]
tier2_methods = ["none", "kfc"]

[early]
ordering = ["alpha", "beta"]
"""


def _config(root: Path, name: str, epochs: int = 2) -> Path:
    tasks = root / "tasks"
    if not tasks.exists():
        write_tiny_tasks(tasks)
    path = root / f"{name}.toml"
    text = CONFIG.format(name=name, results=root / name, tasks=tasks, epochs=epochs)
    path.write_text(text, encoding="utf-8")
    return path


def _numbers(results: Path) -> dict[str, dict]:
    """Every run record's numbers by id: what must not depend on who ran it."""
    out = {}
    for kind in ("tier1", "tier2", "state", "layers"):
        for rec in RunStore(results).records(kind):
            keep = {k: rec[k] for k in ("metrics", "predicted_forgetting", "omega") if k in rec}
            if "train" in rec:
                keep["history"] = rec["train"]["history"]
            keep["n_examples"] = rec.get("n_examples")
            out[f"{kind} {rec['id']}"] = keep
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """One process, one thread (as each worker below): the numbers to match."""
    root = tmp_path_factory.mktemp("side")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_experiment(load_config(_config(root, "one")))
    finally:
        torch.set_num_threads(threads)
    assert res.complete and res.ran == RUNS
    numbers = _numbers(root / "one")
    assert len([k for k in numbers if k.startswith(("tier1", "tier2"))]) == RUNS
    assert len([k for k in numbers if k.startswith("state")]) == 1
    return root, numbers


def _experiment_process(path: str, go, out: str) -> None:
    """A whole ``run_experiment`` in its own process, started when both
    processes have reached ``go`` (a barrier); its progress lines go to
    ``out``.log as they come, its result to ``out``."""
    torch.set_num_threads(1)
    events: list[str] = []
    with open(out + ".log", "a", encoding="utf-8") as log:

        def emit(message: str) -> None:
            events.append(message)
            log.write(message + "\n")
            log.flush()

        go.wait(120)
        res = run_experiment(load_config(path), on_event=emit)
    Path(out).write_text(json.dumps({"ran": res.ran, "complete": res.complete, "events": events}))


def _two_processes(path: Path, outs: list[Path]) -> tuple[list[mp.Process], object]:
    """The processes, and their start barrier: the caller keeps it alive
    until they have passed it (a collected barrier's semaphores are gone).
    A barrier, not an event set by the parent: a spawned child spends
    seconds importing torch, and with an event set at once the first child
    to get there could run every tiny run before the other started (seen
    once in CI)."""
    ctx = mp.get_context("spawn")
    go = ctx.Barrier(len(outs))
    procs = [ctx.Process(target=_experiment_process, args=(str(path), go, str(o))) for o in outs]
    for p in procs:
        p.start()
    return procs, go


def test_two_processes_share_a_state_without_collision_or_loss(reference, tmp_path: Path) -> None:
    root, numbers = reference
    path = _config(root, "two")
    outs = [tmp_path / f"p{i}.json" for i in (1, 2)]
    procs, _go = _two_processes(path, outs)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    reports = [json.loads(o.read_text()) for o in outs]
    assert all(r["complete"] for r in reports)
    # Each run computed once, by one of them, and both did some of the work.
    assert sum(r["ran"] for r in reports) == RUNS
    assert all(r["ran"] >= 1 for r in reports)
    started = [e for r in reports for e in r["events"] if e.startswith("running ")]
    assert len(started) == len(set(started)) == RUNS + 1  # + the shared curvature state
    assert sum(e.startswith("running state") for e in started) == 1
    # The same records, with the same numbers, as one process stores alone.
    assert _numbers(root / "two") == numbers
    assert [p.name for p in (root / "two").rglob("*.tmp")] == []


def test_workers_flag_stores_what_one_process_does(reference) -> None:
    root, numbers = reference
    path = _config(root, "cli")
    proc = subprocess.run(
        [sys.executable, "-m", "kronlink.cli", "experiment", str(path), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["workers"] == 2 and summary["ran"] == RUNS and summary["complete"]
    # Progress names the worker of every run it started and finished.
    lines = proc.stderr.splitlines()
    # KRONLINK_KEEP_FREED_MEMORY is on by default
    assert any("] w1: started (pid" in line and "freed memory kept" in line for line in lines)
    running = [line for line in lines if ": running tier" in line]
    assert len(running) == RUNS
    assert all(line.split("] ", 1)[1][:4] in ("w1: ", "w2: ") for line in running)
    assert _numbers(root / "cli") == numbers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("keep", [True, False])
def test_a_spawned_worker_keeps_freed_memory_exactly_when_told(tmp_path: Path, keep: bool) -> None:
    # mallopt is per process and a spawned child starts afresh; the runner
    # tells its workers (parallel._worker) what the parent does. The child's
    # first report says what glibc took there.
    from kronlink.experiments.parallel import _worker

    cfg = load_config(_config(tmp_path, "spawned"))
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(cfg, {}, None, 1, send, keep))
    proc.start()
    send.close()
    first = recv.recv()
    events = [first[1]]
    with pytest.raises(EOFError):
        while True:
            events.append(recv.recv()[1])
    proc.join(120)
    assert proc.exitcode == 0
    assert first[1].startswith("started (pid ")
    assert ("freed memory kept" in first[1]) is keep
    assert events[-1].startswith("finished: ran ")


def _read_until(proc: subprocess.Popen, done, timeout: float) -> list[str]:
    """stderr lines of ``proc`` until ``done(lines)`` holds (or it ends)."""
    lines: list[str] = []
    end = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if done(lines):
            return lines
    raise AssertionError("the awaited output never came:\n" + "\n".join(lines[-20:]))


def _start(path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kronlink.cli", "experiment", str(path), "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,  # its own process group: the test can kill it whole
    )


def _finished(lines: list[str]) -> int:
    return sum(": test " in line for line in lines)


def test_a_killed_experiment_keeps_its_finished_runs(reference) -> None:
    root, numbers = reference
    path = _config(root, "killed")
    proc = _start(path)
    try:
        _read_until(proc, lambda lines: _finished(lines) >= 3, 240)
        os.killpg(proc.pid, signal.SIGKILL)  # parent and both workers, mid-run
    finally:
        proc.kill()
        proc.wait(30)
    results = root / "killed"
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in results.glob("runs/*/*.json")}
    done = _numbers(results)
    trained = [k for k in done if k.startswith(("tier1", "tier2"))]
    assert 3 <= len(trained) < RUNS
    # What finished is whole and exactly what one process stores.
    assert all(numbers[k] == v for k, v in done.items())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = run_experiment(load_config(path))
    finally:
        torch.set_num_threads(threads)
    assert again.complete and again.ran == RUNS - len(trained)  # nothing recomputed
    for p, (content, mtime) in kept.items():
        assert p.read_bytes() == content and p.stat().st_mtime_ns == mtime
    assert set(_numbers(results)) == set(numbers)


def test_a_killed_process_leaves_its_run_to_the_other(reference, tmp_path: Path) -> None:
    root, numbers = reference
    path = _config(root, "killed_one")
    outs = [tmp_path / f"p{i}.json" for i in (1, 2)]
    procs, _go = _two_processes(path, outs)
    log = Path(str(outs[1]) + ".log")
    end = time.monotonic() + 120
    while not (log.exists() and "running " in log.read_text()):
        assert time.monotonic() < end and procs[1].is_alive(), "process 2 never started a run"
        time.sleep(0.02)  # polling a file the other process writes, not a guess at timing
    os.kill(procs[1].pid, signal.SIGKILL)  # inside a run, holding its claim
    procs[1].join(30)
    procs[0].join(120)
    assert procs[0].exitcode == 0 and procs[1].exitcode == -signal.SIGKILL
    first = json.loads(outs[0].read_text())
    assert first["complete"]
    # Process 1 ran everything process 2 did not store, the killed run included.
    second = log.read_text().splitlines()
    by_second = [x for x in second if ": test " in x]
    assert first["ran"] == RUNS - len(by_second)
    killed = [x for x in second if x.startswith("running ")][-1]  # "running <kind> <id> ..."
    kind_id = " ".join(killed.split()[1:3])
    assert not any(x.startswith(kind_id + " ") for x in second)  # it never finished there
    assert sum(e.startswith(f"running {kind_id} ") for e in first["events"]) == 1
    assert _numbers(root / "killed_one") == numbers


def _hold_then_sleep(folder: str, name: str, held: mp.Event) -> None:
    with Claims(folder).hold(name):
        held.set()
        time.sleep(600)


def test_claim_is_exclusive_and_dies_with_its_holder(tmp_path: Path) -> None:
    claims = Claims(tmp_path)
    ctx = mp.get_context("spawn")
    held = ctx.Event()
    holder = ctx.Process(target=_hold_then_sleep, args=(str(tmp_path), "tier1-x", held))
    holder.start()
    try:
        assert held.wait(60)
        with pytest.raises(Busy), claims.hold("tier1-x"):
            pass
        assert claims.path("tier1-x").read_text().strip() == str(holder.pid)
        with claims.hold("tier1-y"):  # other names are free
            pass
        t0 = time.monotonic()
        assert not claims.wait_free("tier1-x", deadline=t0 + 0.3)
        assert time.monotonic() - t0 >= 0.3
        os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        holder.join(30)
        assert claims.wait_free("tier1-x", deadline=time.monotonic() + 30)
        with claims.hold("tier1-x"), claims.hold("tier1-x"):  # re-entrant in one process
            assert claims.path("tier1-x").read_text().strip() == str(os.getpid())
    finally:
        holder.kill()
        holder.join(30)


def test_workers_setting_is_checked(tmp_path: Path) -> None:
    path = _config(tmp_path, "cfg")
    text = path.read_text()
    assert load_config(path).workers == 1
    path.write_text(text.replace('device = "cpu"', 'device = "cpu"\nworkers = 2'))
    assert load_config(path).workers == 2
    path.write_text(text.replace('device = "cpu"', 'device = "cpu"\nworkers = 0'))
    with pytest.raises(ConfigError, match="workers must be an integer >= 1, got 0"):
        load_config(path)
