"""The decisive experiment's command (issue 15; docs/experiments.md, "The
decisive experiment"): inputs that fit a 64 MiB carry, a dry run that
predicts each phase's seconds, and a run inside a deadline that writes every
record as it finishes.

    python -m kronlink.experiments.decisive prepare INPUTS [--smoke]
    python -m kronlink.experiments.decisive dry-run INPUTS [--device cuda]
    python -m kronlink.experiments.decisive run INPUTS OUT [--budget 540] [--smoke]

``experiments/decisive.sh`` chains them. ``INPUTS`` holds ``tasks/<name>/``
(seeded subsets, concepts without definitions, only those some query names)
and ``encoder/`` (the MiniLM layers the ranker uses, in fp16).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = [
    "CARRY_LIMIT",
    "Phase",
    "budget_table",
    "instantiate",
    "plan",
    "prepare_encoder",
    "prepare_tasks",
    "run",
]

CARRY_LIMIT = 64 * 2**20  # bytes a device command carries
CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "decisive.toml"
THROUGHPUT = Path(__file__).resolve().parents[2] / "experiments" / "decisive_throughput.json"
SMOKE_LIMITS = (8, 4, 6)  # train, dev, test queries a task in the smoke form


# ---- inputs ----------------------------------------------------------------------


def _subset(items: list, n: int | None, seed: int) -> list:
    items = list(items)
    if n is None or n >= len(items):
        return items
    random.Random(seed).shuffle(items)
    return items[:n]


def prepare_tasks(
    sources: Mapping[str, Path], out: Path, limits: tuple[int, int, int], seed: int = 0
) -> dict[str, int]:
    """Each source task folder cut to seeded train/dev/test subsets of
    ``limits`` (the same subsets the runner would take: it takes them again,
    of the same size, and gets the whole folder), concepts cut to those some
    kept query names as gold or candidate, definitions dropped. Returns the
    bytes written per task."""
    from kronlink.data.io import load_task, save_task
    from kronlink.data.schema import Concept, Task

    sizes = {}
    for name, src in sources.items():
        task = load_task(src)
        kept = []
        for split, n in zip(("train", "dev", "test"), limits, strict=True):
            kept += _subset(task.split(split), n, seed)
        used = {q.gold for q in kept} | {c.id for q in kept for c in q.candidates or ()}
        concepts = tuple(
            Concept(c.id, c.name, c.synonyms, "") for c in task.concepts if c.id in used
        )
        folder = out / "tasks" / name
        if folder.exists():
            shutil.rmtree(folder)
        meta = {**task.meta, "decisive_subset": {"limits": list(limits), "seed": seed}}
        save_task(Task(task.name, concepts, tuple(kept), meta), folder)
        sizes[name] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return sizes


def prepare_encoder(out: Path, num_layers: int, source: Path | None = None) -> int:
    """The first ``num_layers`` layers of the BERT folder ``source`` (default:
    the installed all-MiniLM-L6-v2) in fp16, with its tokenizer files; the
    ranker casts them back to fp32 on load. Returns the bytes written."""
    from safetensors.torch import load_file, save_file

    from kronlink.models._text import default_encoder_path

    src = source or default_encoder_path()
    dst = out / "encoder"
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    cfg["num_hidden_layers"] = num_layers
    cfg["torch_dtype"] = "float16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    keep = {}
    for key, value in load_file(str(src / "model.safetensors")).items():
        parts = key.removeprefix("bert.").split(".")
        if parts[0] == "encoder" and parts[2].isdigit() and int(parts[2]) >= num_layers:
            continue
        if parts[0] == "pooler":
            continue
        keep[key] = value.half().contiguous() if value.is_floating_point() else value
    save_file(keep, str(dst / "model.safetensors"))
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy(src / f, dst / f)
    return sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---- config -----------------------------------------------------------------------


def instantiate(
    inputs: Path,
    out: Path,
    *,
    scratch: Path | None = None,
    smoke: bool = False,
    config: Path = CONFIG,
    device: str | None = None,
) -> Any:
    """decisive.toml with its inputs, its output folders and (``smoke``) the
    smoke form's sizes filled in: an ``ExperimentConfig``."""
    from kronlink.experiments.config import parse_config

    # Absolute: the config is parsed relative to its own folder, so a relative
    # INPUTS found no task folder and keyed every run on an empty digest.
    inputs, out = Path(inputs).resolve(), Path(out).resolve()
    raw = tomllib.loads(config.read_text(encoding="utf-8"))
    raw["results"] = str(out / "results")
    raw["scratch"] = str(scratch or out.parent / f".{out.name}-scratch")
    raw["tasks"]["dirs"] = {n: str(inputs / "tasks" / n) for n in raw["tasks"]["names"]}
    if device is not None:
        raw["device"] = device
    for r in raw["rankers"].values():
        r["model"] = {**r.get("model", {}), "encoder": str(inputs / "encoder")}
        if smoke:
            # the task folders already hold the smoke sizes (prepare --smoke)
            r["limits"] = list(SMOKE_LIMITS)
            r["train"] = {**r["train"], "epochs": 1, "batch_size": 4, "evals_per_epoch": 1}
            r["model"]["num_layers"] = 1
            r["model"]["max_length"] = 32
            r["method_grids"] = {m: g[:1] for m, g in r.get("method_grids", {}).items()}
    if smoke:
        raw["seeds"] = raw["seeds"][:1]
        names = raw["tasks"]["names"]
        raw["tier2"]["orderings"] = [[names[0], names[1]], [names[1], names[2]]]
        raw["curvature"]["limit"] = 8
        raw["curvature"]["batch_size"] = 4
    # the path a report shows: the registered config, its inputs filled in above
    return parse_config(raw, path=config)


# ---- the dry run ------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    kind: str  # the runner's record kind, for the deadline's guesses
    runs: int = 0
    train_queries: float = 0.0  # queries through a training step (epochs counted)
    penalised_queries: float = 0.0  # of which under a penalty
    eval_queries: float = 0.0
    curvature_queries: float = 0.0


def plan(cfg: Any) -> list[Phase]:
    """Every run the config defines, phase by phase, in query counts."""
    (r,) = cfg.rankers
    n_train, n_dev, n_test = r.limits or (
        cfg.tasks.train_limit,
        cfg.tasks.dev_limit,
        cfg.tasks.test_limit,
    )
    tc = r.train_config(0, None)
    sizes = {}
    for name in cfg.tasks.names:
        folder = cfg.task_dir(name)
        head = json.loads((folder / "task.json").read_text(encoding="utf-8"))
        s = head.get("sizes", {}).get("queries", {})
        sizes[name] = tuple(
            min(n, s.get(split, n)) if n is not None else s.get(split, 0)
            for n, split in ((n_train, "train"), (n_dev, "dev"), (n_test, "test"))
        )
    seeds = len(cfg.seeds)

    def run_cost(ph: Phase, train_task: str, eval_tasks: list[str], penalised: bool) -> None:
        tr, dv, _ = sizes[train_task]
        ph.runs += seeds
        q = seeds * tr * tc.epochs
        ph.train_queries += q
        ph.penalised_queries += q if penalised else 0
        ph.eval_queries += seeds * (tc.evals_per_epoch * tc.epochs * dv)
        ph.eval_queries += seeds * sum(sizes[t][1] + sizes[t][2] for t in eval_tasks)

    t1 = Phase("tier 1 (one model a task)", "tier1")
    for name in cfg.tasks.names:
        run_cost(t1, name, [name], False)
    states = Phase("curvature of each tier-1 model", "state")
    for name in sorted({o[0] for o in cfg.orderings(cfg.tier2, 2)}):
        states.runs += seeds
        states.curvature_queries += seeds * min(cfg.curvature.limit or 1e18, sizes[name][0])
    t2 = Phase("tier 2 (every ordering, method, λ)", "tier2")
    layers = Phase("Ω by layer of each chosen tier-2 run", "layers")
    methods = r.tier2_methods or cfg.tier2.methods
    for a, b in cfg.orderings(cfg.tier2, 2):
        for m in methods:
            grid = r.grid_for(m, cfg.selection.grid)
            for _ in grid if m != "none" else [None]:
                run_cost(t2, b, [a, b], m != "none")
            layers.runs += seeds if cfg.tier2.layers else 0
    return [t1, states, t2] + ([layers] if layers.runs else [])


def _seconds(ph: Phase, tp: Mapping[str, float]) -> float:
    plain = ph.train_queries - ph.penalised_queries
    return (
        plain / tp["train_qps"]
        + ph.penalised_queries / tp["train_qps"] * tp["penalty_factor"]
        + ph.eval_queries / tp["eval_qps"]
        + ph.curvature_queries / tp["curvature_qps"]
        + ph.runs * tp["overhead_s"]
    )


def guesses(phases: list[Phase], tp: Mapping[str, float]) -> dict[str, float]:
    """Seconds of one run of each kind (the deadline's prior)."""
    return {ph.kind: _seconds(ph, tp) / ph.runs for ph in phases if ph.runs}


def budget_table(phases: list[Phase], throughputs: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: runs, queries and predicted seconds per phase under each
    throughput profile (its source named under the table)."""
    names = list(throughputs)
    head = ["phase", "runs", "train queries", "eval queries", "curvature queries"]
    head += [f"predicted s, {n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    totals = dict.fromkeys(names, 0.0)
    for ph in phases:
        row = [ph.name, str(ph.runs), f"{ph.train_queries:,.0f}", f"{ph.eval_queries:,.0f}"]
        row.append(f"{ph.curvature_queries:,.0f}")
        for n in names:
            s = _seconds(ph, throughputs[n])
            totals[n] += s
            row.append(f"{s:,.0f}")
        lines.append("| " + " | ".join(row) + " |")
    total_row = ["**total**", str(sum(p.runs for p in phases)), "", "", ""]
    total_row += [f"**{totals[n]:,.0f}**" for n in names]
    lines.append("| " + " | ".join(total_row) + " |")
    lines.append("")
    for n in names:
        tp = throughputs[n]
        lines.append(
            f"- {n}: train {tp['train_qps']:g} q/s (×{tp['penalty_factor']:g} under a penalty), "
            f"eval {tp['eval_qps']:g} q/s, curvature {tp['curvature_qps']:g} q/s, "
            f"{tp['overhead_s']:g} s a run. Source: {tp['source']}"
        )
    return "\n".join(lines)


CPU_RECORD = Path(__file__).resolve().parents[2] / "results" / "decisive" / "throughput_cpu.json"


def load_throughputs(path: Path = THROUGHPUT) -> dict[str, dict[str, Any]]:
    """The H200 profile (from docs/benchmarks.md, partly assumed: its
    ``source`` says which) and, when measured, this machine's CPU profile."""
    profiles = json.loads(path.read_text(encoding="utf-8"))
    if CPU_RECORD.exists():
        profiles["cpu"] = json.loads(CPU_RECORD.read_text(encoding="utf-8"))
    return profiles


def measure(inputs: Path, n_train: int = 64, n_eval: int = 128) -> dict[str, Any]:
    """This machine's throughput with decisive.toml's ranker on the prepared
    inputs: one real training (``n_train`` queries, one epoch, no dev
    evaluation), its evaluation, a curvature estimate, and a penalised
    training of the same size."""
    import torch

    from kronlink.curvature import TaskState, estimate_curvature
    from kronlink.data.io import load_task
    from kronlink.evaluation import evaluate
    from kronlink.penalties import build_penalty
    from kronlink.training import train

    cfg = instantiate(inputs, Path("/tmp/kronlink-decisive-measure"), device="cpu")
    (r,) = cfg.rankers
    task = load_task(inputs / "tasks" / cfg.tasks.names[0])
    tr = task.split("train")[:n_train]
    ev = task.split("test")[:n_eval]
    tc = replace(r.train_config(0, "cpu"), epochs=1, evals_per_epoch=1)
    model_kw = {k: None if v == "none" else v for k, v in r.model.items()}

    def new_model() -> Any:
        from kronlink.models import build_ranker

        return build_ranker(r.kind, **model_kw)

    t0 = time.perf_counter()
    model = new_model()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    train(model, tr, tr[:1], tc)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate(model, ev, batch_size=tc.eval_batch_size)
    eval_s = time.perf_counter() - t0
    bs = cfg.curvature.batch_size
    t0 = time.perf_counter()
    batches = [model.encode(tr[i : i + bs]) for i in range(0, len(tr), bs)]
    curv = estimate_curvature(model, batches, kinds=cfg.curvature.kinds, fisher="empirical")
    curv_s = time.perf_counter() - t0
    state = TaskState.from_model(model, curv, {})
    penalty = build_penalty("kfc", [state], [10.0])
    model2 = new_model()
    t0 = time.perf_counter()
    train(model2, tr, tr[:1], tc, penalty=penalty)
    pen_s = time.perf_counter() - t0
    return {
        "train_qps": round(n_train / train_s, 2),
        "penalty_factor": round(pen_s / train_s, 2),
        "eval_qps": round(len(ev) / eval_s, 2),
        "curvature_qps": round(len(tr) / curv_s, 2),
        "overhead_s": round(build_s, 2),
        "source": (
            f"measured on this machine by `python -m kronlink.experiments.decisive measure` "
            f"({n_train} train / {len(ev)} eval queries, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average "
            f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}: shared machine)"
        ),
        "loadavg": os.getloadavg(),
    }


# ---- the run ----------------------------------------------------------------------


def run(
    inputs: Path,
    out: Path,
    budget_s: float,
    *,
    smoke: bool = False,
    profile: str = "h200",
    device: str | None = None,
    scratch: Path | None = None,
) -> dict:
    """Train what is not stored in ``out/results`` yet, starting no run that
    would not end inside ``budget_s``; then write ``out/report.md`` from the
    records. Returns the summary (also written to ``out/summary.json``)."""
    from kronlink.experiments import collect_results, render_report, run_experiment

    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    cfg = instantiate(inputs, out, scratch=scratch, smoke=smoke, device=device)
    phases = plan(cfg)
    tp = load_throughputs()
    if profile not in tp:
        raise SystemExit(f"--profile {profile!r}: expected one of {sorted(tp)} ({THROUGHPUT})")
    guess = guesses(phases, tp[profile])

    def event(message: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f} s] {message}", file=sys.stderr, flush=True)

    # The report needs a moment at the end: keep it out of the training budget.
    res = run_experiment(
        cfg, max_seconds=max(0.0, budget_s - 15), on_event=event, guess_seconds=guess
    )
    report = render_report(collect_results(cfg))
    (out / "report.md").write_text(report, encoding="utf-8")
    summary = {
        "ran": res.ran,
        "reused": res.reused,
        "complete": res.complete,
        "seconds": round(time.monotonic() - t0, 1),
        "guess_seconds": {k: round(v, 2) for k, v in guess.items()},
        "profile": profile,
        "smoke": smoke,
        "loadavg": os.getloadavg(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kronlink.experiments.decisive")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="cut tasks and the encoder to fit the carry")
    p.add_argument("inputs", type=Path)
    p.add_argument("--tasks-from", type=Path, required=True, help="folder of built task folders")
    p.add_argument("--smoke", action="store_true")
    d = sub.add_parser("dry-run", help="predicted seconds per phase")
    d.add_argument("inputs", type=Path)
    d.add_argument("--smoke", action="store_true")
    r = sub.add_parser("run", help="run inside the budget, records under OUT")
    r.add_argument("inputs", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--budget", type=float, default=540.0, help="seconds (default %(default)s)")
    r.add_argument("--smoke", action="store_true")
    r.add_argument("--profile", default="h200", help="throughput profile for the deadline")
    r.add_argument("--device", default=None)
    r.add_argument("--scratch", type=Path, default=None, help="weights and states")
    w = sub.add_parser("report", help="the section of docs/results.md from OUT/results")
    w.add_argument("inputs", type=Path)
    w.add_argument("out", type=Path, help="a returned OUT (holding results/)")
    w.add_argument("--md", type=Path, default=Path("docs/results.md"))
    w.add_argument("--smoke", action="store_true")
    m = sub.add_parser("measure", help="this machine's throughput, stored as a record")
    m.add_argument("inputs", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "measure":
        rec = measure(args.inputs)
        CPU_RECORD.parent.mkdir(parents=True, exist_ok=True)
        CPU_RECORD.write_text(json.dumps(rec, indent=1), encoding="utf-8")
        print(json.dumps(rec))
        return 0
    if args.cmd == "prepare":
        raw = tomllib.loads(CONFIG.read_text(encoding="utf-8"))
        (ranker,) = raw["rankers"].values()
        limits = tuple(SMOKE_LIMITS if args.smoke else ranker["limits"])
        names = raw["tasks"]["names"]
        sizes = prepare_tasks({n: args.tasks_from / n for n in names}, args.inputs, limits)
        layers = 1 if args.smoke else ranker["model"]["num_layers"]
        sizes["encoder"] = prepare_encoder(args.inputs, layers)
        total = folder_bytes(args.inputs)
        print(json.dumps({"bytes": sizes, "total": total, "limit": CARRY_LIMIT}))
        return 0 if total <= CARRY_LIMIT else 1
    if args.cmd == "report":
        from kronlink.experiments import collect_results, render_report, write_section

        cfg = instantiate(args.inputs, args.out, smoke=args.smoke)
        res = collect_results(cfg)
        write_section(args.md, cfg.name, render_report(res))
        print(
            json.dumps({"section": cfg.name, "complete": res.complete, "missing": len(res.missing)})
        )
        return 0
    if args.cmd == "dry-run":
        cfg = instantiate(args.inputs, Path("/tmp/kronlink-decisive-dry"), smoke=args.smoke)
        print(budget_table(plan(cfg), load_throughputs()))
        return 0
    summary = run(
        args.inputs,
        args.out,
        args.budget,
        smoke=args.smoke,
        profile=args.profile,
        device=args.device,
        scratch=args.scratch,
    )
    print(json.dumps(summary))
    return 0 if summary["complete"] else 3


if __name__ == "__main__":
    sys.exit(_main())
