"""``kronlink train``: fine-tune a ranker on a task, optionally protecting
earlier tasks (a penalty against their stored states, learning-rate control or
replay)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from kronlink.cli._common import keep_freed_memory_if_set, load_split, progress_bar
from kronlink.errors import KronlinkError
from kronlink.penalties import PENALTY_METHODS, PenaltyMethod


def _build_model(args: argparse.Namespace):
    from kronlink.models import build_ranker, load_ranker

    if args.init:
        return load_ranker(args.init)
    overrides: dict = {}
    if args.tiny:
        overrides["encoder" if args.model == "transformer" else "tokenizer"] = None
    elif args.encoder:
        overrides["encoder" if args.model == "transformer" else "tokenizer"] = args.encoder
    if args.model == "transformer":
        overrides["pooling"] = args.pooling
    return build_ranker(args.model, **overrides)


def run(args: argparse.Namespace) -> int:
    from kronlink.training import TrainConfig, train

    keep_freed_memory_if_set()

    task, train_q = load_split(args.task, "train", args.limit, args.seed)
    dev_limit = (
        args.dev_limit
        if args.dev_limit is not None
        else (max(50, args.limit // 4) if args.limit else None)
    )
    _, dev_q = load_split(args.task, "dev", dev_limit, args.seed)
    from kronlink.training import seed_everything

    seed_everything(args.seed)  # the new head's initial weights are random too
    model = _build_model(args)
    lr = args.lr if args.lr is not None else (1e-3 if model.kind == "cnn" else 1e-4)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=lr,
        head_lr=args.head_lr,
        seed=args.seed,
        device=args.device,
        evals_per_epoch=args.evals_per_epoch,
    )
    penalty, param_groups, replay, priors = _continual_hooks(args, model)
    if replay is not None:
        cfg = replace(cfg, replay_per_batch=args.replay_per_batch)

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"training {model.kind} ({n_params / 1e6:.1f}M parameters) on {task.name}: "
        f"{len(train_q)} train, {len(dev_q)} dev queries, device {cfg.device or 'auto'}",
        file=sys.stderr,
    )
    steps = -(-len(train_q) // cfg.batch_size) * cfg.epochs
    bar = progress_bar(steps, "train", "step")

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
    forgetting = None
    if priors:
        from kronlink.penalties import predicted_forgetting

        forgetting = predicted_forgetting(model, priors)
    record = {
        "task": task.name,
        "task_dir": str(args.task),
        "model": model.kind,
        "method": args.method,
        "lambdas": _lambdas(args.lam, len(priors)) if priors else [],
        "priors": [str(p) for p in args.prior],
        "predicted_forgetting": forgetting,
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
    if forgetting is not None:
        summary["predicted_forgetting"] = forgetting
    print(json.dumps(summary))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
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
        "--pooling",
        choices=["cls", "mean"],
        default="mean",
        help="transformer: what the head reads, the mean of the real tokens (learns faster "
        "from a sentence encoder such as MiniLM) or [CLS] (the paper's) (default: %(default)s)",
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
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-4, CNN 1e-3)")
    t.add_argument(
        "--head-lr",
        type=float,
        default=3e-3,
        help="learning rate of the freshly initialised scoring head (default: %(default)s)",
    )
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
    t.set_defaults(func=run)


def _add_method_options(t: argparse.ArgumentParser) -> None:
    g = t.add_argument_group("continual learning")
    g.add_argument(
        "--method",
        choices=METHODS,
        default="none",
        help="how to protect earlier tasks: a penalty (l2, ewc, kfc, ekfac) against "
        "the --prior states, learning-rate control (lrc) or experience replay "
        "(replay, research only: needs old data) (default: %(default)s)",
    )
    g.add_argument(
        "--prior",
        action="append",
        default=[],
        metavar="STATE",
        help="task state file from `kronlink fisher` (repeat for several prior tasks)",
    )
    g.add_argument(
        "--lambda",
        dest="lam",
        default="1",
        help="penalty strength: one number for all priors or one per prior, "
        "comma-separated (default: %(default)s)",
    )
    g.add_argument(
        "--lrc-gamma",
        type=float,
        default=1 / 2.6,
        help="lrc: each layer's rate is the next layer's times this (default: 1/2.6)",
    )
    g.add_argument(
        "--replay",
        action="append",
        default=[],
        metavar="TASK_DIR",
        help="replay: an old task folder whose train queries are mixed in",
    )
    g.add_argument(
        "--replay-size",
        type=int,
        default=1000,
        help="replay: old queries kept per task (default: %(default)s)",
    )
    g.add_argument(
        "--replay-per-batch",
        type=int,
        default=4,
        help="replay: old queries added to each batch (default: %(default)s)",
    )


METHODS = [*(m.value for m in PenaltyMethod), "lrc", "replay"]


def _lambdas(text: str, n: int) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError as exc:
        raise KronlinkError(f"--lambda: expected numbers, got {text!r}") from exc
    if len(values) == 1:
        values *= n
    if len(values) != n:
        raise KronlinkError(f"--lambda: {len(values)} values for {n} --prior state(s)")
    return values


def _continual_hooks(args: argparse.Namespace, model):
    """The penalty, optimizer groups and replay set that ``--method`` asks for,
    and the loaded prior states (for predicted forgetting)."""
    from kronlink.curvature import TaskState
    from kronlink.strategies import lrc_param_groups, replay_sample

    priors = [TaskState.load(p, model=model) for p in args.prior]
    if args.method in PENALTY_METHODS:
        if not priors:
            raise KronlinkError(f"--method {args.method} needs at least one --prior STATE")
        from kronlink.penalties import build_penalty

        return (
            build_penalty(args.method, priors, _lambdas(args.lam, len(priors))),
            None,
            None,
            priors,
        )
    if args.method == "lrc":
        return None, lrc_param_groups(args.lrc_gamma), None, priors
    if args.method == "replay":
        if not args.replay:
            raise KronlinkError("--method replay needs at least one --replay TASK_DIR")
        old: list = []
        for i, d in enumerate(args.replay):
            _, qs = load_split(d, "train", None, args.seed)
            old += replay_sample(qs, args.replay_size, seed=args.seed + i)
        return None, None, old, priors
    return None, None, None, priors
