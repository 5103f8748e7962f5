"""How often the retriever's acronym and loose-key matches
(kronlink/retrieval/retriever.py, ``Retriever.match``) fire on mentions the
stored ontology never saw, and how often the concept they name is the gold.

    python bench/mention_variants.py results/clinical/mention_variants.json
    python bench/mention_variants.py --table results/clinical/mention_variants.json

Per source (ICD-10-CM 2026 inclusion terms, HPO synonyms), every mention the
full task keeps (the builders' filter, deduplicated) is held out: the
ontology searched is the one the full task stores, the concepts minus every
query string (``without_query_strings``), so no mention matches its own copy.
A match is "right" when the gold is among the concepts it names, "only" when
it names the gold alone. The clinical list (tests/clinical_mentions.py) is
matched against the ontology as the demo stores it (the first 1,000 source
mentions, ``kronlink.cli.demo.SUBSET``, give its queries; the rest stay synonyms). Not a timing: no lock needed.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _record import record_main
from clinical_mentions import LISTS, accepted

from kronlink.cli.demo import SUBSET as DEMO_LIMIT
from kronlink.data.builders.hpo import hpo_obo_path, parse_hpo
from kronlink.data.builders.icd10cm import icd10cm_tabular_path, parse_icd10cm
from kronlink.data.splits import filter_mentions, without_query_strings
from kronlink.retrieval import Retriever

KINDS = ("exact", "acronym", "loose")


def sources() -> dict[str, tuple[list, list]]:
    """ICD-10-CM's and HPO's concepts and (unsplit) mentions, as the builders parse them."""
    return {"icd10cm": parse_icd10cm(icd10cm_tabular_path()), "hpo": parse_hpo(hpo_obo_path())}


def measure(name: str, concepts: list, mentions: list, examples: int = 15) -> dict:
    kept, _ = filter_mentions(mentions, concepts, dedupe=True)
    retriever = Retriever(without_query_strings(concepts, kept))
    fired: Counter[str] = Counter()
    right: Counter[str] = Counter()
    only: Counter[str] = Counter()
    family: Counter[str] = Counter()
    wrong_examples: dict[str, list] = {k: [] for k in KINDS}
    right_examples: dict[str, list] = {k: [] for k in KINDS}
    for q in kept:
        kind, positions = retriever.match(q.mention)
        if not kind:
            continue
        ids = [retriever.ids[i] for i in positions]
        fired[kind] += 1
        ok = q.gold in ids
        right[kind] += ok
        only[kind] += ids == [q.gold]
        # ICD-10-CM: the gold's category ("Measles NOS" is B05.9, the match
        # B05 "Measles") is what tests/clinical_mentions.py accepts too.
        family[kind] += any(
            q.gold == i or (name == "icd10cm" and q.gold.startswith(i)) for i in ids[:1]
        )
        bucket = right_examples if ok else wrong_examples
        if len(bucket[kind]) < examples:
            names = [retriever.concepts[i].name for i in positions[:3]]
            bucket[kind].append([q.mention, q.gold, ids[:3], names])
    demo_queries, _ = filter_mentions(mentions[:DEMO_LIMIT], concepts, dedupe=True)
    demo_ontology = without_query_strings(concepts, demo_queries)
    demo = Retriever(demo_ontology)
    clinical = []
    for mention, answers in LISTS[name].items():
        kind, positions = demo.match(mention)
        ids = [demo.ids[i] for i in positions]
        right_first = bool(ids) and accepted(ids[0], answers)
        clinical.append({"mention": mention, "kind": kind, "ids": ids[:5], "right": right_first})
    # The acronyms each ontology spells out, for a reader to judge (none of
    # the held-out mentions is one the stored ontology still spells out).
    spelled = {
        a: [demo.concepts[i].id + " " + demo.concepts[i].name for i in pos]
        for a, pos in sorted(demo._acronyms.items())
    }
    return {
        "acronyms_demo_ontology": spelled,
        "mentions": len(kept),
        "concepts": len(concepts),
        "fired": dict(fired),
        "right": dict(right),
        "only_gold": dict(only),
        "first_is_gold_or_its_category": dict(family),
        "right_examples": right_examples,
        "wrong_examples": wrong_examples,
        "clinical_demo_ontology": clinical,
    }


def table(record: dict) -> str:
    lines = [
        "| source | held-out mentions | rule | fired | gold among them | precision | gold alone"
        " | first is gold or its category |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("icd10cm", "hpo"):
        r = record[name]
        for kind in KINDS:
            n = r["fired"].get(kind, 0)
            ok = r["right"].get(kind, 0)
            prec = f"{ok / n:.3f}" if n else "–"
            lines.append(
                f"| {name} | {r['mentions']:,} | {kind} | {n:,} | {ok:,} | {prec} | {r['only_gold'].get(kind, 0):,} |"
                f" {r['first_is_gold_or_its_category'].get(kind, 0):,} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    record_main(
        __doc__,
        lambda: {name: measure(name, c, m) for name, (c, m) in sources().items()},
        table,
        argv,
    )


if __name__ == "__main__":
    main()
