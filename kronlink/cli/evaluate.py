"""``kronlink evaluate``: accuracy@1, MRR and recall@k of a saved model."""

from __future__ import annotations

import argparse
import json

from kronlink.cli._common import load_split, progress_bar


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


def run(args: argparse.Namespace) -> int:
    from kronlink.evaluation import evaluate
    from kronlink.models import load_ranker
    from kronlink.training import pick_device

    task, queries = load_split(args.task, args.split, args.limit, args.seed)
    model = load_ranker(args.model).to(pick_device(args.device))
    bar = progress_bar(len(queries), f"evaluate {task.name}/{args.split}", "query")
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


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    e.set_defaults(func=run)
