"""What the retriever's acronym and loose-key matches (``Retriever.match``,
setting ``retriever_variants``) do to BM25-mode retrieval: recall@1/10/25/100
on the test splits of the full ICD-10-CM and HPO tasks (seed 0, split by
mention, as ``kronlink build-tasks`` makes them), over the ontology they
store (every query string removed), with the variants off and on.

    python bench/variants_recall.py results/retrieval/variants_recall.json
    python bench/variants_recall.py --table results/retrieval/variants_recall.json

The splits are the builders' (filter, split) without their candidate lists,
which this does not need. Not a timing: no lock needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record_main
from mention_variants import sources

from kronlink.data.splits import filter_mentions, split_queries, without_query_strings
from kronlink.retrieval import Retriever

KS = (1, 10, 25, 100)


def measure(concepts: list, mentions: list) -> dict:
    kept, _ = filter_mentions(mentions, concepts, dedupe=True)
    split = split_queries(kept, "mention", 0)
    ontology = without_query_strings(concepts, split)
    test = [q for q in split if q.split == "test"]
    out: dict = {"test_queries": len(test), "concepts": len(ontology)}
    for variants in (False, True):
        r = Retriever(ontology, mode="bm25", variants=variants)
        hits = r.search([q.mention for q in test], max(KS))
        ranked = [[cid for cid, _ in h] for h in hits]
        out["on" if variants else "off"] = {
            str(k): round(
                sum(q.gold in h[:k] for q, h in zip(test, ranked, strict=True)) / len(test), 4
            )
            for k in KS
        }
        kinds = [r.match(q.mention)[0] for q in test]
        out[f"matched_{'on' if variants else 'off'}"] = {
            kind: kinds.count(kind) for kind in ("exact", "acronym", "loose")
        }
    return out


def table(record: dict) -> str:
    lines = [
        "| task | test queries | variants | recall@1 | recall@10 | recall@25 | recall@100 | matched: exact / acronym / loose |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for name in ("icd10cm", "hpo"):
        r = record[name]
        for state in ("off", "on"):
            m = r[f"matched_{state}"]
            rec = " | ".join(f"{r[state][str(k)]:.4f}" for k in KS)
            lines.append(
                f"| {name} | {r['test_queries']:,} | {state} | {rec} | {m['exact']} / {m['acronym']} / {m['loose']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    record_main(
        __doc__, lambda: {name: measure(c, m) for name, (c, m) in sources().items()}, table, argv
    )


if __name__ == "__main__":
    main()
