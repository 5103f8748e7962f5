"""The exact-name prior (kronlink/ranking.py) per margin: what it does to a
model's dev/test top-1 on its tasks, and to the clinical list ranked over the
BM25 retriever's candidates (exact names and stored synonyms first), offline.

    python bench/exact_margin.py results/clinical/exact_margin.json \\
        --model v2=DEMO/data/artifacts/versions/main/j2-a1 \\
        --task icd10cm=DEMO/tasks/icd10cm --task hpo=DEMO/tasks/hpo

Per task it also counts the evaluation queries that have an exact-name
candidate, and among those the ones whose exact candidate is not the gold
(where the prior can only hurt). Not a timing: no lock needed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _record import loadavg, write_record
from clinical_mentions import LISTS, accepted

from kronlink.data._text import name_keys, normalize
from kronlink.data.io import load_task
from kronlink.data.schema import Candidate, Query
from kronlink.evaluation import evaluate
from kronlink.models import load_ranker
from kronlink.ranking import exact_mask, rank_scores
from kronlink.retrieval import Retriever
from kronlink.settings import DEFAULT_EXACT_MARGIN

MARGINS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1e9)


def _pair(text: str) -> tuple[str, str]:
    name, _, value = text.partition("=")
    if not value:
        raise SystemExit(f"expected NAME=PATH, got {text!r}")
    return name, value


def _clinical(model, retriever: Retriever, onto: str, margin: float) -> dict:
    by_id = {c.id: c for c in retriever.concepts}
    items = LISTS[onto]
    hits = retriever.search(list(items), 10)
    queries = [
        Query(mention=m, gold=None, candidates=tuple(Candidate(c, by_id[c].name) for c, _ in h))
        for m, h in zip(items, hits, strict=True)
    ]
    exact_ids = [frozenset(retriever.ids[i] for i in retriever.exact(m)) for m in items]
    with torch.no_grad():
        scores, _ = rank_scores(model, queries, exact_margin=margin, exact_ids=exact_ids)
    exact = exact_mask(queries, scores.shape[1], exact_ids)
    rows = []
    for i, (m, codes) in enumerate(items.items()):
        cands = queries[i].candidates or ()
        s = scores[i, : len(cands)]
        top = cands[int(s.argmax())]
        row = {"mention": m, "answer": top.id, "name": top.name, "ok": accepted(top.id, codes)}
        hit = exact[i, : len(cands)]
        if hit.any():  # how far the best exact candidate trails the top one (0: it is top)
            row["exact_gap"] = round(float(s.max() - s[hit].max()), 3)
        rows.append(row)
    return {"correct": sum(r["ok"] for r in rows), "n": len(rows), "rows": rows}


def source_prior() -> dict:
    """How often a source synonym equal to a concept's name (after
    :func:`name_keys`) names that concept: every EXACT/RELATED HPO synonym and
    ICD-10-CM inclusion term, before any task filter. The log odds are the
    exact-name prior's default (kronlink.settings.DEFAULT_EXACT_MARGIN)."""
    from kronlink.data.builders.hpo import hpo_obo_path, parse_hpo
    from kronlink.data.builders.icd10cm import icd10cm_tabular_path, parse_icd10cm

    out: dict = {}
    for name, (concepts, mentions) in {
        "icd10cm": parse_icd10cm(icd10cm_tabular_path()),
        "hpo": parse_hpo(hpo_obo_path()),
    }.items():
        keys: dict[str, set[str]] = {}
        for c in concepts:
            for k in name_keys(c.name):
                keys.setdefault(k, set()).add(c.id)
        right = wrong = 0
        examples = []
        for q in mentions:
            ids = keys.get(normalize(q.mention))
            if ids and q.gold in ids:
                right += 1
            elif ids:
                wrong += 1
                examples.append([q.mention, q.gold, sorted(ids)])
        out[name] = {"mentions": len(mentions), "names_their_gold": right, "names_another": wrong}
        out[name]["examples_another"] = examples[:10]
    right = sum(v["names_their_gold"] for v in out.values())
    wrong = sum(v["names_another"] for v in out.values())
    out["log_odds"] = round(math.log(right / wrong), 3) if wrong else None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--model", action="append", type=_pair, required=True)
    p.add_argument("--task", action="append", type=_pair, required=True)
    args = p.parse_args()
    record: dict = {"loadavg_before": loadavg()}
    record["source_prior"] = source_prior()
    print("source prior", {k: v for k, v in record["source_prior"].items() if k != "examples"})
    record["margins"] = [m if m < 1e9 else "inf" for m in MARGINS]
    tasks = {name: load_task(path) for name, path in args.task}
    record["tasks"] = {}
    for name, task in tasks.items():
        info = {}
        for split in ("dev", "test"):
            qs = task.split(split)
            with_exact = [
                q
                for q in qs
                if any(normalize(q.mention) in name_keys(c.name) for c in q.candidates or ())
            ]
            wrong = [
                q
                for q in with_exact
                if not any(
                    c.id == q.gold and normalize(q.mention) in name_keys(c.name)
                    for c in q.candidates or ()
                )
            ]
            info[split] = {
                "n": len(qs),
                "with_exact": len(with_exact),
                "exact_not_gold": len(wrong),
            }
        record["tasks"][name] = info
    retrievers = {name: Retriever(t.concepts, mode="bm25") for name, t in tasks.items()}
    record["models"] = {}
    for label, path in args.model:
        model = load_ranker(path).eval()
        out: dict = {"path": str(path), "splits": {}, "clinical": {}}
        for name, task in tasks.items():
            for split in ("dev", "test"):
                qs = task.split(split)
                out["splits"][f"{name}/{split}"] = [
                    round(evaluate(model, qs, exact_margin=m).accuracy, 4) for m in MARGINS
                ]
            if name in LISTS:
                per = [_clinical(model, retrievers[name], name, m) for m in MARGINS]
                out["clinical"][name] = [c["correct"] for c in per]
                out["clinical"][f"{name}_rows_at_default"] = per[
                    MARGINS.index(DEFAULT_EXACT_MARGIN)
                ]["rows"]
                out["clinical"][f"{name}_rows_model_alone"] = per[0]["rows"]
        record["models"][label] = out
        print(label, json.dumps({k: v for k, v in out.items() if k == "splits"}))
        print(label, {k: v for k, v in out["clinical"].items() if "_rows_" not in k})
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
