"""The clinical list (tests/clinical_mentions.py) against the real ontologies,
and what the BM25-mode retriever (exact names first) makes of it.

The issue's bar (the demo's served model >= 80% top-1 through HTTP) is not met
and not asserted here; this pins the list and the retriever's share of it."""

from __future__ import annotations

from functools import cache

import pytest
from clinical_mentions import LISTS, accepted

from kronlink.data._text import normalize
from kronlink.data.builders.hpo import hpo_obo_path, parse_hpo
from kronlink.data.builders.icd10cm import icd10cm_tabular_path, parse_icd10cm
from kronlink.retrieval import Retriever

pytestmark = pytest.mark.slow


@cache
def _concepts(name: str):
    if name == "icd10cm":
        return parse_icd10cm(icd10cm_tabular_path())[0]
    return parse_hpo(hpo_obo_path())[0]


@pytest.mark.parametrize("name", ["icd10cm", "hpo"])
def test_the_list_names_real_codes_and_exact_names_come_first(name):
    items = LISTS[name]
    concepts = _concepts(name)
    ids = {c.id for c in concepts}
    assert len(items) >= 20
    for mention, codes in items.items():
        for code in codes:
            assert code.rstrip("*") in ids, (mention, code)
    r = Retriever(concepts, mode="bm25")
    hits = r.search(list(items), 10)
    by_name = {normalize(c.name): c.id for c in concepts}
    top1 = {m: h[0][0] for m, h in zip(items, hits, strict=True)}
    # A mention that is a concept's name gets that concept first (item 3's rule).
    exact = [m for m in items if normalize(m) in by_name]
    assert exact and all(top1[m] == by_name[normalize(m)] for m in exact)
    right = sum(accepted(top1[m], c) for m, c in items.items())
    found = sum(
        any(accepted(cid, c) for cid, _ in h) for (m, c), h in zip(items.items(), hits, strict=True)
    )
    print(f"{name}: BM25 retriever top-1 {right}/{len(items)}, recall@10 {found}/{len(items)}")
    assert right >= len(exact)
