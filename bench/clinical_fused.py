"""The clinical list offline on a served model's ontologies, BM25 against fused
candidates (kronlink.retrieval), ranked by the same function serving uses
(kronlink.ranking.rank_scores, the default exact_margin): what the demo would
answer if it ran ``retriever_mode=fused``. Encodes every entry of both
ontologies (minutes on 2 cores); not a timing.

    python bench/clinical_fused.py results/clinical/fused_offline.json \\
        --model DEMO/data/artifacts/versions/main/j2-a1 --tasks DEMO/tasks
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _record import loadavg, write_record
from clinical_mentions import LISTS, accepted

from kronlink.data.io import load_task
from kronlink.data.schema import Candidate, Query
from kronlink.models import load_ranker
from kronlink.ranking import rank_scores
from kronlink.retrieval import retriever_for
from kronlink.settings import DEFAULT_EXACT_MARGIN, Settings


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--tasks", type=Path, required=True)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args()
    record: dict = {"loadavg_before": loadavg()}
    record.update(model=str(args.model), k=args.k, exact_margin=DEFAULT_EXACT_MARGIN)
    model = load_ranker(args.model).eval()
    settings = Settings()
    for onto, items in LISTS.items():
        concepts = load_task(args.tasks / onto).concepts
        by_id = {c.id: c for c in concepts}
        for mode in ("bm25", "fused"):
            t0 = time.perf_counter()
            r = retriever_for(concepts, settings, mode=mode)
            build_s = time.perf_counter() - t0
            hits = r.search(list(items), args.k)
            qs = [
                Query(m, None, candidates=tuple(Candidate(c, by_id[c].name) for c, _ in h))
                for m, h in zip(items, hits, strict=True)
            ]
            exact = [frozenset(r.ids[i] for i in r.exact(m)) for m in items]
            with torch.no_grad():
                scores, _ = rank_scores(
                    model, qs, exact_margin=DEFAULT_EXACT_MARGIN, exact_ids=exact
                )
            rows = []
            for i, (m, codes) in enumerate(items.items()):
                cands = qs[i].candidates or ()
                top = cands[int(scores[i, : len(cands)].argmax())]
                rows.append(
                    {
                        "mention": m,
                        "answer": top.id,
                        "name": top.name,
                        "ok": accepted(top.id, codes),
                        "retrieved": any(accepted(c.id, codes) for c in cands),
                    }
                )
            out = {
                "top1": sum(x["ok"] for x in rows),
                f"recall{args.k}": sum(x["retrieved"] for x in rows),
                "n": len(rows),
                "build_s": round(build_s, 1),
                "rows": rows,
            }
            record.setdefault(onto, {})[mode] = out
            print(onto, mode, {k: v for k, v in out.items() if k != "rows"}, flush=True)
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
