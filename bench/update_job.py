"""Wall time of one update job by phase, and the bytes stored per task.

    .venv/bin/python bench/update_job.py [--model cnn|transformer] [--limit 2500]
        [--k 10] [--epochs 2] [--method kfc] [--lambda 10|auto] [--grid paper|half]
        [--threads N] [--device cpu]

Setup (not timed): ICD-10-CM is the prior task (a ranker trained on it, its
curvature estimated and saved as a state file, both registered as version 1
of a SQLite registry with a local artifact store), HPO the new one, staged as
an upload would be. The timed job is the worker's own job body,
``worker.job.run_job``, from the call to its return: claim (lease), validate,
load (checksummed artifacts), ``run_update`` (select_lambda with "auto",
train, curvature, evaluate), write artifacts, commit the version, delete the
staged data. Prints a markdown table (phase, seconds, share of the job's wall
time), the share outside train + select_lambda + curvature (the issue's
target: under 10% on a realistic task size), and the stored bytes of the new
task's state against the model version's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kronlink.contract import UpdateJobSpec
from kronlink.curvature import TaskState, estimate_curvature
from kronlink.data.builders import build_task
from kronlink.data.io import save_task
from kronlink.models import build_ranker
from kronlink.registry import (
    ArtifactStore,
    activate_version,
    active_version,
    add_task_state,
    create_engine_from_url,
    create_job,
    create_ontology,
    create_task,
    create_version,
    get_job,
    list_task_states,
    make_session_factory,
    upgrade,
)
from kronlink.settings import Settings
from kronlink.submission import parse_lambdas
from kronlink.training import TrainConfig, seed_everything, train
from worker.job import JobContext, Outcome, run_job

WORK_PHASES = ("train", "select_lambda", "curvature")


def setup(args: argparse.Namespace, root: Path) -> tuple[Path, Path, Path, TrainConfig]:
    """The prior model and state (ICD-10-CM) and the staged new task (HPO)."""
    t0 = time.perf_counter()
    old = build_task("icd10cm", seed=0, k=args.k, limit=args.limit)
    new = build_task("hpo", seed=0, k=args.k, limit=args.limit)
    staged = save_task(new, root / "staged" / "hpo")
    seed_everything(0)
    kw = {"dropout": 0.0} if args.model == "cnn" else {"num_layers": 3}
    model = build_ranker(args.model, **kw)
    lr = 1e-3 if args.model == "cnn" else 1e-4
    cfg = TrainConfig(epochs=args.epochs, batch_size=16, lr=lr, device=args.device, seed=0)
    train(model, old.split("train"), old.split("dev"), cfg)
    qs = old.split("train")
    batches = [model.encode(qs[i : i + 16]) for i in range(0, len(qs), 16)]
    curv = estimate_curvature(model, batches, kinds=("kfac", "diag"))
    prior = TaskState.from_model(model, curv, {"task": old.name, "train_size": len(qs)})
    prior_path = root / "icd10cm.safetensors"
    prior.save(prior_path)
    model_dir = root / "v1"
    model.to("cpu").save(model_dir)
    sizes = {s: len(new.split(s)) for s in ("train", "dev", "test")}
    print(f"setup {time.perf_counter() - t0:.1f} s; new task hpo {sizes}")
    return model_dir, prior_path, staged, cfg


def job(args, model_dir: Path, prior_path: Path, staged: Path, cfg: TrainConfig, root: Path):
    """The worker's job body (``worker.job.run_job``) on a SQLite registry and a
    local artifact store, with v1 (ICD-10-CM) registered as the worker would
    have left it. Timed from the call to its return: claim, validate, load,
    run_update, write, commit, delete the staged data."""
    settings = Settings(data_dir=root / "data", progress_interval_s=2.0)
    upgrade(settings.database)
    engine = create_engine_from_url(settings.database)
    ctx = JobContext(
        settings=settings,
        factory=make_session_factory(engine),
        store=ArtifactStore(settings.artifact_url),
        owner="bench",
    )
    model_art = ctx.store.put_dir("versions/main/v1", model_dir)
    state_art = ctx.store.put_file("states/main/v1/icd10cm", prior_path)
    with ctx.factory.begin() as s:
        onto = create_ontology(s, "icd10cm")
        task = create_task(s, "icd10cm", ontology_id=onto.id)
        v1 = create_version(s, lineage="main", method="none", artifact=model_art, task_id=task.id)
        add_task_state(s, v1.id, task.id, state_art)
        activate_version(s, v1.id)
    staged_id = uuid.uuid4().hex
    settings.staging_path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(staged, settings.staging_path / staged_id)
    lambdas = parse_lambdas(args.lam)
    spec = UpdateJobSpec(
        task_name="hpo",
        staged_id=staged_id,
        method=args.method,
        lambdas=list(lambdas) if isinstance(lambdas, tuple) else lambdas,
        train=dataclasses.asdict(cfg),
        half_decades=args.grid == "half",
    )
    with ctx.factory.begin() as s:
        row, _ = create_job(s, lineage="main", payload=spec.model_dump(mode="json"))
    t0 = time.perf_counter()
    outcome = run_job(ctx, row.id)
    wall = time.perf_counter() - t0
    with ctx.factory.begin() as s:
        done = get_job(s, row.id)
        v2 = active_version(s, "main")
        states = list_task_states(s, v2.id)
    engine.dispose()
    if outcome != Outcome.SUCCEEDED:
        raise SystemExit(f"the job ended {outcome.value}: {done.error}")
    new_state = next(st for st in states if st.artifact.uri.endswith("/hpo"))
    return done, v2, wall, new_state.artifact.bytes, v2.artifact.bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["cnn", "transformer"], default="cnn")
    p.add_argument("--limit", type=int, default=2500, help="mentions per task before splitting")
    p.add_argument("--k", type=int, default=10, help="candidates per query")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--method", default="kfc")
    p.add_argument("--lambda", dest="lam", default="10")
    p.add_argument("--grid", choices=["paper", "half"], default="paper", help="λ grid of auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, prior_path, staged, cfg = setup(args, root)
        done, v2, wall, state_bytes, model_bytes = job(
            args, model_dir, prior_path, staged, cfg, root
        )
    t = done.timings
    m = v2.metrics
    print(
        f"\n{args.model}, method {args.method}, λ {args.lam} -> {v2.lambdas}, "
        f"{args.epochs} epoch(s), test accuracy {m['test']['accuracy']:.4f}, "
        f"predicted forgetting {m['predicted_forgetting']}\n"
    )
    # run_update's own phases nest inside the worker's "update" phase
    inner = {k.removeprefix("update."): v for k, v in t.items() if k.startswith("update.")}
    inner.pop("total", None)
    rows = [(k, v) for k, v in t.items() if "." not in k and k != "update"]
    rows += [(f"update: {k}", v) for k, v in inner.items()]
    rows.append(("update: other", t.get("update", 0.0) - sum(inner.values())))
    rows.append(("claim + commit + delete", wall - sum(v for k, v in t.items() if "." not in k)))
    print("| phase | seconds | share of wall time |")
    print("|---|---|---|")
    for phase, sec in rows:
        print(f"| {phase} | {sec:.3f} | {sec / wall:.1%} |")
    print(f"| **job (run_job)** | {wall:.3f} | 100% |")
    outside = wall - sum(inner.get(k, 0.0) for k in WORK_PHASES)
    print(f"\nshare outside {' + '.join(WORK_PHASES)}: {outside / wall:.1%} (target < 10%)")
    print(
        f"new task state: {state_bytes:,} bytes; model version: {model_bytes:,} bytes; "
        f"state / model {state_bytes / model_bytes:.2f}x"
    )
    if m.get("selection"):
        print(json.dumps(m["selection"], indent=1))


if __name__ == "__main__":
    main()
