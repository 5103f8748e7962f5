"""The steps every task builder shares once it has concepts and raw mentions.

filter -> split -> the ontology minus every query string -> BM25 index over
exactly that ontology -> candidates (gold inserted for train only) -> Task.
Builders differ only in how they read their source.

The index is always built from the ontology the task stores, so the
candidates of a saved task can be regenerated from its ontology.jsonl alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kronlink.data.candidates import CandidateIndex, attach_candidates
from kronlink.data.schema import SPLITS, Concept, Query, Task
from kronlink.data.splits import (
    DEFAULT_FRACTIONS,
    filter_mentions,
    split_queries,
    without_query_strings,
)


def assemble_task(
    name: str,
    concepts: Sequence[Concept],
    mentions: Sequence[Query],
    *,
    seed: int,
    split_rule: str,
    k: int,
    meta: dict[str, Any],
    dedupe: bool = True,
    presplit: bool = False,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Task:
    """Build a Task from concepts and gold-labelled mentions (split unset).

    The stored (and searched) ontology is the concepts as given minus every
    string used as a query in any split (:func:`without_query_strings`): the
    ontology outlives the job's data (DESIGN.md section 1), so no mention,
    train or held-out, is copied into it. For sources whose mentions *are*
    ontology synonyms (HPO, ICD-10-CM inclusion terms) the index therefore
    holds the names (and definitions) only. Earlier builds folded the train
    mentions in as synonyms; that stored query text in the ontology artifact.
    With ``presplit`` the mentions already carry their split.
    """
    kept, report = filter_mentions(mentions, concepts, dedupe=dedupe)
    split = kept if presplit else split_queries(kept, split_rule, seed, fractions)
    ontology = without_query_strings(concepts, split)
    index = CandidateIndex(ontology)
    by_id = {c.id: c for c in ontology}
    # Train and evaluation queries differ only in gold insertion; order in the
    # task follows the source order within each split.
    queries: list[Query] = []
    for s in SPLITS:
        part = [q for q in split if q.split == s]
        if part:
            queries += attach_candidates(part, index, by_id, k, insert_gold=s == "train", seed=seed)
    meta = {
        **meta,
        "seed": seed,
        "split_rule": str(split_rule),
        "fractions": list(fractions),
        "k": k,
        "filter": report.as_dict(),
        "synonyms": "source_minus_queries",
    }
    return Task(name=name, concepts=tuple(ontology), queries=tuple(queries), meta=meta)
