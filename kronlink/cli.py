"""The ``kronlink`` command line: build tasks, train, evaluate.

This is the one place in the library that prints and draws progress bars;
library functions report progress through callbacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kronlink.errors import KronlinkError

log = logging.getLogger("kronlink")


def _subset(queries: list, limit: int | None, seed: int) -> list:
    """A deterministic subset: the order of the task file is shuffled with
    ``seed`` first, so a limit does not keep only the first codes of a chapter."""
    if limit is None or limit >= len(queries):
        return list(queries)
    picked = list(queries)
    random.Random(seed).shuffle(picked)
    return picked[:limit]


def _bar(total: int, desc: str, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)


# --------------------------------------------------------------------- build-tasks
def cmd_build_tasks(args: argparse.Namespace) -> int:
    from kronlink.data.builders import BUILDERS, build_task
    from kronlink.data.io import save_task

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise KronlinkError(
            f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(sorted(BUILDERS))}"
        )
    out = Path(args.out)
    for name in names:
        t0 = time.perf_counter()
        print(f"building {name} ...", file=sys.stderr)
        task = build_task(
            name, seed=args.seed, split_rule=args.split, k=args.candidates, limit=args.limit
        )
        save_task(task, out / name)
        sizes = {s: len(task.split(s)) for s in ("train", "dev", "test")}
        print(
            json.dumps(
                {
                    "task": name,
                    "dir": str(out / name),
                    "concepts": len(task.concepts),
                    "queries": sizes,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
        )
    return 0


# --------------------------------------------------------------------- train
def _load_split(task_dir: str, split: str, limit: int | None, seed: int):
    from kronlink.data.io import load_task

    task = load_task(task_dir)
    return task, _subset(task.split(split), limit, seed)


def _build_model(args: argparse.Namespace):
    from kronlink.models import build_ranker, load_ranker

    if args.init:
        return load_ranker(args.init)
    overrides: dict = {}
    if args.tiny:
        overrides["encoder" if args.model == "transformer" else "tokenizer"] = None
    elif args.encoder:
        overrides["encoder" if args.model == "transformer" else "tokenizer"] = args.encoder
    return build_ranker(args.model, **overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from kronlink.training import TrainConfig, train

    task, train_q = _load_split(args.task, "train", args.limit, args.seed)
    dev_limit = (
        args.dev_limit
        if args.dev_limit is not None
        else (max(50, args.limit // 4) if args.limit else None)
    )
    _, dev_q = _load_split(args.task, "dev", dev_limit, args.seed)
    model = _build_model(args)
    lr = args.lr if args.lr is not None else (1e-3 if model.kind == "cnn" else 3e-5)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=lr,
        seed=args.seed,
        device=args.device,
        evals_per_epoch=args.evals_per_epoch,
    )
    penalty = None
    param_groups = None
    replay = None
    if getattr(args, "method", "none") != "none":
        from kronlink.strategies import build_strategy

        strategy = build_strategy(args, model)
        penalty, param_groups, replay = strategy.penalty, strategy.param_groups, strategy.replay
        if replay is not None:
            cfg = TrainConfig(**{**cfg.__dict__, "replay_per_batch": args.replay_per_batch})

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"training {model.kind} ({n_params / 1e6:.1f}M parameters) on {task.name}: "
        f"{len(train_q)} train, {len(dev_q)} dev queries, device {cfg.device or 'auto'}",
        file=sys.stderr,
    )
    steps = -(-len(train_q) // cfg.batch_size) * cfg.epochs
    bar = _bar(steps, "train", "step")

    def on_progress(p) -> None:
        bar.update(1)
        post = {"loss": f"{p.loss:.3f}"}
        if p.penalty:
            post["pen"] = f"{p.penalty:.3g}"
        if p.dev_accuracy is not None:
            post["dev"] = f"{p.dev_accuracy:.3f}"
            bar.write(f"epoch {p.epoch + 1} step {p.step}: dev accuracy {p.dev_accuracy:.4f}")
        bar.set_postfix(post)

    result = train(
        model,
        train_q,
        dev_q,
        cfg,
        penalty=penalty,
        param_groups=param_groups,
        replay=replay,
        on_progress=on_progress,
    )
    bar.close()
    out = Path(args.out)
    model.to("cpu").save(out)
    record = {
        "task": task.name,
        "task_dir": str(args.task),
        "model": model.kind,
        "method": getattr(args, "method", "none"),
        "train_queries": len(train_q),
        "dev_queries": len(dev_q),
        "config": cfg.__dict__,
        "result": result.as_dict(),
    }
    (out / "train.json").write_text(json.dumps(record, indent=2))
    summary = {
        "out": str(out),
        "best_dev_accuracy": result.best_dev.accuracy if result.best_dev else None,
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
    }
    print(json.dumps(summary))
    return 0


# --------------------------------------------------------------------- evaluate
def _bm25_top1(task, queries) -> dict:
    """BM25's own ranking on the same queries: the baseline a ranker must beat.
    The index holds concept names and synonyms (train mentions only), exactly
    what generated the candidates."""
    from kronlink.data.candidates import CandidateIndex
    from kronlink.evaluation import metrics_from_ranks

    index = CandidateIndex(list(task.concepts))
    hits = index.search([q.mention for q in queries], k=10)
    ranks = []
    for q, found in zip(queries, hits, strict=True):
        ids = [cid for cid, _ in found]
        ranks.append(ids.index(q.gold) + 1 if q.gold in ids else 0)
    return metrics_from_ranks(ranks).as_dict()


def cmd_evaluate(args: argparse.Namespace) -> int:
    from kronlink.evaluation import evaluate
    from kronlink.models import load_ranker
    from kronlink.training import pick_device

    task, queries = _load_split(args.task, args.split, args.limit, args.seed)
    model = load_ranker(args.model).to(pick_device(args.device))
    bar = _bar(len(queries), f"evaluate {task.name}/{args.split}", "query")
    last = [0]

    def on_batch(done: int, total: int) -> None:
        bar.update(done - last[0])
        last[0] = done

    metrics = evaluate(model, queries, batch_size=args.batch_size, on_batch=on_batch)
    bar.close()
    result = {"task": task.name, "split": args.split, **metrics.as_dict()}
    if args.baseline:
        result["bm25"] = _bm25_top1(task, queries)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{task.name} {args.split}: n={metrics.n}")
        print(
            f"  ranker  accuracy {metrics.accuracy:.4f}  MRR {metrics.mrr:.4f}  "
            + "  ".join(f"R@{k} {v:.4f}" for k, v in metrics.recall.items())
        )
        if args.baseline:
            b = result["bm25"]
            print(
                f"  BM25    accuracy {b['accuracy']:.4f}  MRR {b['mrr']:.4f}  "
                + "  ".join(f"R@{k} {v:.4f}" for k, v in b["recall"].items())
            )
    return 0


# --------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kronlink",
        description="Medical entity linking that learns new ontologies without forgetting.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "build-tasks",
        help="build real tasks from ontology data shipped in PyPI packages",
        description="Write one folder per task with ontology.jsonl, queries.jsonl and task.json.",
    )
    b.add_argument("--out", required=True, help="folder to write the task folders into")
    b.add_argument(
        "--tasks", default="icd10cm,hpo", help="comma-separated task names (default: %(default)s)"
    )
    b.add_argument(
        "--split",
        choices=["mention", "concept"],
        default="mention",
        help="split rule: by mention (the paper's) or by concept (default: %(default)s)",
    )
    b.add_argument(
        "--candidates", type=int, default=25, help="candidates per query (default: %(default)s)"
    )
    b.add_argument(
        "--limit", type=int, default=None, help="keep at most this many queries per task"
    )
    b.add_argument(
        "--seed", type=int, default=0, help="split and shuffle seed (default: %(default)s)"
    )
    b.set_defaults(func=cmd_build_tasks)

    t = sub.add_parser(
        "train",
        help="train a ranker on a task",
        description="Fine-tune a ranker on a task's train split, keeping the best on dev.",
    )
    t.add_argument("--task", required=True, help="task folder from build-tasks")
    t.add_argument(
        "--model",
        choices=["transformer", "cnn"],
        default="transformer",
        help="ranker kind (default: %(default)s)",
    )
    t.add_argument("--out", required=True, help="folder to save the trained model in")
    t.add_argument("--init", default=None, help="start from this saved model (continual learning)")
    t.add_argument(
        "--encoder",
        default=None,
        help="local Hugging Face BERT folder (default: all-MiniLM-L6-v2 from its package); "
        "for the CNN, the folder whose tokenizer it uses",
    )
    t.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny randomly initialised model instead (tests and smoke runs)",
    )
    t.add_argument("--epochs", type=int, default=3, help="epochs (default: %(default)s)")
    t.add_argument(
        "--batch-size", type=int, default=16, help="queries per step (default: %(default)s)"
    )
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: 3e-5, CNN 1e-3)")
    t.add_argument(
        "--limit", type=int, default=None, help="train on a seeded subset of this many queries"
    )
    t.add_argument(
        "--dev-limit",
        type=int,
        default=None,
        help="dev queries for checkpoint choice (default: all, or limit/4 with --limit)",
    )
    t.add_argument(
        "--evals-per-epoch",
        type=int,
        default=1,
        help="dev evaluations per epoch (default: %(default)s)",
    )
    t.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    t.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)"
    )
    _add_method_options(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "evaluate",
        help="evaluate a saved model on a task split",
        description="Accuracy@1, MRR and recall@k of a saved model on a task split.",
    )
    e.add_argument("--model", required=True, help="saved model folder")
    e.add_argument("--task", required=True, help="task folder")
    e.add_argument(
        "--split",
        choices=["train", "dev", "test"],
        default="test",
        help="split (default: %(default)s)",
    )
    e.add_argument(
        "--limit", type=int, default=None, help="evaluate a seeded subset of this many queries"
    )
    e.add_argument(
        "--batch-size", type=int, default=64, help="queries per batch (default: %(default)s)"
    )
    e.add_argument("--baseline", action="store_true", help="also report BM25's own ranking")
    e.add_argument(
        "--json", action="store_true", help="print one JSON object (accuracy, mrr, n, ...)"
    )
    e.add_argument("--seed", type=int, default=0, help="subset seed (default: %(default)s)")
    e.add_argument("--device", default=None, help="device (default: CUDA if available)")
    e.set_defaults(func=cmd_evaluate)
    return p


def _add_method_options(t: argparse.ArgumentParser) -> None:
    """Continual-learning options of ``train``; filled in by kronlink.strategies."""
    t.set_defaults(method="none")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    # bm25s sets its own logger to DEBUG; keep it quiet unless asked
    logging.getLogger("bm25s").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except KronlinkError as exc:
        print(f"kronlink {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
