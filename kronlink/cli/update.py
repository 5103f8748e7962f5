"""``kronlink update``: fold a new task into a saved model without old data.

Loads the model, the prior tasks' states and the new task, runs
``kronlink.update.run_update`` with a progress bar per phase, saves the new
model and the new task's state, and prints one JSON summary. Exit codes: 0
done, 2 error, 3 done but the quality gate failed (the files are written all
the same, so they can be inspected).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from kronlink.cli._common import progress_bar, subset
from kronlink.errors import ConfigError
from kronlink.penalties import DEFAULT_METHOD, PenaltyMethod
from kronlink.submission import parse_lambdas


def parse_grid(text: str) -> dict:
    if text == "paper":
        return {}
    if text == "half":
        return {"half_decades": True}
    try:
        return {"lambda_grid": tuple(float(v) for v in text.split(",") if v.strip())}
    except ValueError as exc:
        raise ConfigError(f"--grid: expected paper, half or numbers, got {text!r}") from exc


def _limited(task, limit: int | None, dev_limit: int | None, seed: int):
    """The task with seeded subsets of its splits (train: limit; dev and test:
    dev_limit, by default limit/4 but at least 50)."""
    if limit is None:
        return task
    dev_limit = dev_limit if dev_limit is not None else max(50, limit // 4)
    keep = {"train": limit, "dev": dev_limit, "test": dev_limit}
    queries = [q for s, n in keep.items() for q in subset(task.split(s), n, seed)]
    return replace(task, queries=tuple(queries))


class _Bars:
    """One progress bar per phase (and per training run in select_lambda)."""

    def __init__(self) -> None:
        self.bar = None
        self.key: tuple | None = None

    def __call__(self, e) -> None:
        if e.step is None:
            if e.message and e.message != "started":
                text = f"[{e.phase}] {e.message}"
                if self.bar is not None:
                    self.bar.write(text, file=sys.stderr)
                else:
                    _err(text)
            return
        key = (e.phase, e.message)
        if key != self.key:
            self.close()
            self.key = key
            desc = f"{e.phase} {e.message}".strip()
            self.bar = progress_bar(e.total_steps or 0, desc, "step")
        self.bar.n = e.step
        post = {}
        if e.loss is not None:
            post["loss"] = f"{e.loss:.3f}"
        if e.penalty:
            post["pen"] = f"{e.penalty:.3g}"
        if e.dev_accuracy is not None:
            post["dev"] = f"{e.dev_accuracy:.3f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def _tune_tower(args: argparse.Namespace, settings, task, retriever):
    """(tower, update): the parent's tower (``--model``'s ``tower/``) tuned on
    the task under the penalty of ``--retriever-prior`` states when the
    settings ask for it; the parent's tower as it is otherwise (None: none)."""
    from kronlink.curvature import TaskState
    from kronlink.retrieval.learn import RetrieverLearnConfig, learn_retriever_task
    from kronlink.retrieval.tower import TOWER_DIR, QueryTower

    folder = Path(args.model) / TOWER_DIR
    tower = QueryTower.load(folder) if folder.is_dir() else None
    if not settings.retriever_tune:
        if args.retriever_prior:
            raise ConfigError("--retriever-prior needs KRONLINK_RETRIEVER_TUNE=true")
        return tower, None
    tower = tower or QueryTower.build()
    priors = [TaskState.load(p, model=tower) for p in args.retriever_prior]
    config = RetrieverLearnConfig.from_settings(settings, seed=args.seed)
    train = [q for q in task.queries if q.split in (None, "train")]
    update = learn_retriever_task(tower, retriever.dense, train, task.split("dev"), priors, config)
    return update.tower, update


def run(args: argparse.Namespace) -> int:
    from kronlink.curvature import TaskState
    from kronlink.data.io import load_task
    from kronlink.models import load_ranker
    from kronlink.retrieval import task_retriever, top1
    from kronlink.settings import Settings
    from kronlink.training import TrainConfig
    from kronlink.update import UpdateRequest, run_update

    # The same settings as the service and worker (KRONLINK_* variables): the
    # retrieval prior and the gate's retriever floor are fitted with the
    # retriever that serving will use, as the worker's job does.
    settings = Settings()
    if settings.keep_freed_memory:
        from kronlink._malloc import keep_freed_memory

        keep_freed_memory()
    task = _limited(load_task(args.task), args.limit, args.dev_limit, args.seed)
    # With KRONLINK_RETRIEVER_TUNE, the query tower is tuned first (the
    # worker's order); the prior and the floor are fitted with the tower the
    # new model will serve with (tuned here, or the parent's).
    wanted = settings.retrieval_prior or settings.retriever_gate or settings.retriever_tune
    retriever = task_retriever(task, settings) if wanted else None
    tower, tower_update = _tune_tower(args, settings, task, retriever)
    if retriever is not None and tower is not None:
        retriever = retriever.with_encoder(tower.query_encoder())
    model = load_ranker(args.model)
    lr = args.lr if args.lr is not None else (1e-3 if model.kind == "cnn" else 1e-4)
    request = UpdateRequest(
        method=args.method,
        lambdas=parse_lambdas(args.lam),
        auto_margin=args.margin,
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=lr,
            head_lr=args.head_lr if args.head_lr > 0 else None,
            seed=args.seed,
            device=args.device,
        ),
        kinds=tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else None,
        fisher=args.fisher,
        state_dtype="bf16" if args.bf16 else "fp32",
        quality_gate=args.quality_gate,
        retriever_dev_top1=top1(retriever, task.split("dev"))
        if retriever is not None and settings.retriever_gate
        else None,
        exact_margin=settings.exact_margin,
        **parse_grid(args.grid),
    )
    priors = [TaskState.load(p, model=model) for p in args.prior]
    bars = _Bars()
    try:
        result = run_update(
            model,
            priors,
            task,
            request,
            on_progress=bars,
            retriever=retriever if settings.retrieval_prior else None,
        )
    finally:
        bars.close()
    if result.new_state is None:  # no should_stop is passed, so this cannot happen
        raise ConfigError("the update stopped before it finished; nothing was saved")
    out = Path(args.out)
    model.to("cpu").save(out)
    state_out = Path(args.state_out)
    state_out.parent.mkdir(parents=True, exist_ok=True)
    result.new_state.save(state_out, dtype=request.state_torch_dtype)
    retriever_out = None
    if tower is not None:  # tuned here, or the parent's carried forward
        from kronlink.retrieval.tower import TOWER_DIR

        tower.save(out / TOWER_DIR)
    if tower_update is not None:
        retriever_out = Path(args.retriever_state_out or f"{state_out}.retriever")
        tower_update.state.save(retriever_out, dtype=request.state_torch_dtype)
    summary = {
        "task": task.name,
        "method": request.method,
        "out": str(out),
        "state_out": str(state_out),
        "state_bytes": state_out.stat().st_size,
        **result.summary(),
        "retriever": (
            {**tower_update.summary(), "state_out": str(retriever_out)}
            if tower_update is not None
            else {"tuned": False, "carried": tower is not None}
        ),
    }
    summary["test_accuracy"] = result.test.accuracy if result.test else None
    (out / "update.json").write_text(
        json.dumps({**summary, "request": request.as_dict(), "priors": args.prior}, indent=2)
    )
    print(json.dumps(summary))
    if not result.gate_passed:
        _err(f"kronlink update: quality gate failed: test accuracy < {request.quality_gate}")
        return 3
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser(
        "update",
        help="fold a new task into a saved model under a penalty from prior tasks",
        description="Validate the task, pick λ (auto) or use the given one, train with the "
        "penalty of every --prior state, estimate the new task's state, evaluate.",
    )
    u.add_argument("--model", required=True, help="saved model folder to start from")
    u.add_argument("--task", required=True, help="the new task's folder")
    u.add_argument(
        "--prior",
        action="append",
        default=[],
        metavar="STATE",
        help="a prior task's state file (repeat; the order sets the order of --lambda values)",
    )
    u.add_argument(
        "--method",
        default=DEFAULT_METHOD.value,
        help=f"{', '.join(PenaltyMethod)} (replay is refused: it needs old data) "
        "(default: %(default)s)",
    )
    u.add_argument(
        "--lambda",
        dest="lam",
        default="auto",
        help="'auto' (picked on the new task's dev split), one number, or one per prior, "
        "comma-separated (default: %(default)s)",
    )
    u.add_argument(
        "--grid",
        default="paper",
        help="auto's candidates: paper (1e1,1e3,...,1e9), half (1,3,10,...,1e9) or "
        "comma-separated numbers (default: %(default)s)",
    )
    u.add_argument(
        "--margin",
        type=float,
        default=0.02,
        help="auto: largest λ whose dev accuracy is within this of the unpenalised run's "
        "(default: %(default)s)",
    )
    u.add_argument("--out", required=True, help="folder for the updated model")
    u.add_argument(
        "--retriever-prior",
        action="append",
        default=[],
        help="an earlier task's retriever state (KRONLINK_RETRIEVER_TUNE; repeatable)",
    )
    u.add_argument(
        "--retriever-state-out",
        default=None,
        help="file for the new task's retriever state (default: <state-out>.retriever)",
    )
    u.add_argument("--state-out", required=True, help="file for the new task's state")
    u.add_argument("--epochs", type=int, default=3, help="epochs (default: %(default)s)")
    u.add_argument("--batch-size", type=int, default=16, help="queries per step")
    u.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-4, CNN 1e-3)")
    u.add_argument(
        "--head-lr",
        type=float,
        default=0.0,
        help="learning rate of the scoring head; 0: same as --lr (default: %(default)s)",
    )
    u.add_argument("--kinds", default=None, help="new state's kinds (default: kfac,diag[,ekfac])")
    u.add_argument("--fisher", default="empirical", help="empirical or true (default: %(default)s)")
    u.add_argument("--bf16", action="store_true", help="store the new state's factors in bf16")
    u.add_argument("--quality-gate", type=float, default=None, help="minimum test accuracy")
    u.add_argument("--limit", type=int, default=None, help="train on a seeded subset")
    u.add_argument("--dev-limit", type=int, default=None, help="dev/test subset with --limit")
    u.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    u.add_argument("--device", default=None, help="device (default: CUDA if available)")
    u.set_defaults(func=run)
