"""BM25 candidate generation: scores against a brute-force BM25, gold insertion,
shuffling and determinism."""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import pytest

from kronlink.data._text import normalize
from kronlink.data.candidates import CandidateIndex, attach_candidates, recall_at_k, tokenize
from kronlink.data.schema import Concept, Query

MENTIONS = [
    ("renal failure acute", "C3"),
    ("kidney disease chronic", "C8"),
    ("high blood pressure", "C4"),
    ("diabetes type 2", "C5"),
    ("pulmonary disorder", "C7"),
    ("pseudomonas", "C9"),
    ("mucoviscidosis", "C1"),
    ("wheezing", "C10"),  # no token in the index: every concept scores 0
]
TOL = 1e-4


def brute_force_scores(concepts: list[Concept], mention: str, k1=1.5, b=0.75) -> list[float]:
    """Lucene BM25 (as bm25s computes it), each concept's best entry."""
    entries: list[tuple[int, list[str]]] = []
    for i, c in enumerate(concepts):
        seen = set()
        for text in (c.name, *c.synonyms):
            if normalize(text) not in seen:
                seen.add(normalize(text))
                entries.append((i, tokenize(text)))
    n = len(entries)
    avgdl = sum(len(t) for _, t in entries) / n
    df = Counter(tok for _, toks in entries for tok in set(toks))
    best = [0.0] * len(concepts)
    for i, toks in entries:
        tf = Counter(toks)
        s = 0.0
        for tok in tokenize(mention):
            if tf[tok]:
                idf = math.log(1 + (n - df[tok] + 0.5) / (df[tok] + 0.5))
                s += idf * tf[tok] / (tf[tok] + k1 * (1 - b + b * len(toks) / avgdl))
        best[i] = max(best[i], s)
    return best


@pytest.mark.parametrize("k", [1, 3, 10])
def test_search_matches_brute_force(ontology, k):
    index = CandidateIndex(ontology)
    results = index.search([m for m, _ in MENTIONS], k)
    for (mention, _), hits in zip(MENTIONS, results, strict=True):
        brute = brute_force_scores(ontology, mention)
        by_id = {c.id: s for c, s in zip(ontology, brute, strict=True)}
        assert len(hits) == k
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
        for cid, score in hits:
            assert score == pytest.approx(by_id[cid], abs=TOL)
        expected_top = sorted(brute, reverse=True)[:k]
        assert [s for _, s in hits] == pytest.approx(expected_top, abs=TOL)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_recall_at_k_matches_brute_force(ontology, k):
    queries = [Query(mention=m, gold=g) for m, g in MENTIONS]
    index = CandidateIndex(ontology)
    found = 0
    for m, g in MENTIONS:
        brute = brute_force_scores(ontology, m)
        ranked = sorted(range(len(ontology)), key=lambda i: (-brute[i], i))
        found += g in {ontology[i].id for i in ranked[:k]}
    assert recall_at_k(queries, index, k) == pytest.approx(found / len(MENTIONS))


def test_concept_scores_its_best_entry(ontology):
    index = CandidateIndex(ontology)
    (((top, _), *_),) = index.search(["mucoviscidosis"], 3)
    assert top == "C1"  # found through the synonym, not the name


def test_extra_synonyms_are_searched(ontology):
    plain = CandidateIndex(ontology)
    extended = CandidateIndex(ontology, extra_synonyms={"C10": ["wheezing chest"]})
    assert plain.search(["wheezing"], 1)[0][0][1] == 0.0
    ((cid, score),) = extended.search(["wheezing"], 1)[0:1][0]
    assert cid == "C10" and score > 0
    with pytest.raises(ValueError, match="unknown concept"):
        CandidateIndex(ontology, extra_synonyms={"nope": ["x"]})


def test_no_match_gives_first_concepts_in_order(ontology):
    index = CandidateIndex(ontology)
    assert [cid for cid, _ in index.search(["zzz qqq"], 3)[0]] == ["C1", "C2", "C3"]


def test_k_larger_than_ontology_returns_all(ontology):
    assert len(CandidateIndex(ontology).search(["kidney"], 50)[0]) == len(ontology)


def _queries() -> list[Query]:
    return [Query(mention=m, gold=g, split="train") for m, g in MENTIONS]


def test_training_inserts_gold_inference_does_not(ontology):
    index = CandidateIndex(ontology)
    by_id = {c.id: c for c in ontology}
    k = 2
    train = attach_candidates(_queries(), index, by_id, k, insert_gold=True, seed=0)
    infer = attach_candidates(_queries(), index, by_id, k, insert_gold=False, seed=0)
    for q_train, q_infer, (m, _) in zip(train, infer, MENTIONS, strict=True):
        assert len(q_train.candidates) == k and len(q_infer.candidates) == k
        assert q_train.gold_index() >= 0
        retrieved = {cid for cid, _ in index.search([m], k)[0]}
        assert {c.id for c in q_infer.candidates} == retrieved
        if q_infer.gold_index() < 0:  # a miss: gold plus the top k-1 negatives
            top_k_minus_1 = {cid for cid, _ in index.search([m], k - 1)[0]}
            assert {c.id for c in q_train.candidates} == top_k_minus_1 | {q_train.gold}
        names = {c.id: c.name for c in ontology}
        assert all(c.name == names[c.id] for c in q_train.candidates)
    assert any(q.gold_index() < 0 for q in infer), "the fixture should contain a retrieval miss"


def test_candidates_are_shuffled_deterministically(ontology):
    index = CandidateIndex(ontology)
    by_id = {c.id: c for c in ontology}
    queries = [Query(mention=f"kidney disease {i}", gold="C8") for i in range(40)]
    a = attach_candidates(queries, index, by_id, 5, insert_gold=True, seed=0)
    b = attach_candidates(queries, index, by_id, 5, insert_gold=True, seed=0)
    c = attach_candidates(queries, index, by_id, 5, insert_gold=True, seed=1)
    assert a == b
    assert a != c
    positions = Counter(q.gold_index() for q in a)
    assert len(positions) >= 3, f"gold position should vary, got {positions}"


def test_batched_search_is_fast():
    # An ICD-10-CM-sized ontology: every concept shares tokens with a few hundred others.
    concepts = [
        Concept(f"C{i}", f"term{i % 997} part{i % 991} site{i % 89} code{i}") for i in range(40000)
    ]
    index = CandidateIndex(concepts)
    mentions = [f"term{i % 997} site{i % 89} unknownword" for i in range(3000)]
    started = time.perf_counter()
    hits = index.search(mentions, 25)
    assert time.perf_counter() - started < 10  # about 1 s on a laptop core
    assert all(len(h) == 25 for h in hits)


def test_bm25_never_wakes_jax(tmp_path) -> None:
    """bm25s runs a top-k on JAX at import when JAX is installed, and JAX then
    takes 75% of the GPU (seen on an H200). A stand-in ``jax`` package that
    records being imported shows kronlink's import keeps JAX asleep, while a
    bare ``import bm25s`` in a fresh process does wake it (the check's control)."""
    import subprocess
    import sys

    fake = tmp_path / "site" / "jax"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import os\nopen(os.environ['JAX_MARKER'], 'a').write('imported\\n')\n"
    )
    (fake / "lax.py").write_text("def top_k(x, k):\n    return x[:k]\n")
    env = {"PYTHONPATH": f"{fake.parent}:{Path.cwd()}", "JAX_MARKER": str(tmp_path / "mark")}

    def run(code: str) -> bool:
        (tmp_path / "mark").unlink(missing_ok=True)
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        return (tmp_path / "mark").exists()

    assert not run(
        "import kronlink.data.candidates, bm25s.selection as s; assert not s.JAX_IS_AVAILABLE"
    )
    assert run("import bm25s")
