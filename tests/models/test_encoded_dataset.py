"""Cached per-query tensors batch back to exactly what ``encode`` gives."""

from __future__ import annotations

import random

import torch

from kronlink.data.schema import Candidate, Query
from kronlink.models.dataset import clear_cache, collate, encoded_queries, length_buckets

WORDS = "acute chronic fever of left right femur renal failure type diabetes cough".split()


def _random_queries(n: int, seed: int, context: int = 30) -> list[Query]:
    rng = random.Random(seed)

    def phrase(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    out = []
    for i in range(n):
        # 0 to 6 candidates: batches mix counts, so padded slots appear.
        cands = tuple(Candidate(f"C{i}_{j}", phrase(1, 12)) for j in range(rng.randint(0, 6)))
        gold = cands[rng.randrange(len(cands))].id if cands and rng.random() < 0.8 else "none"
        out.append(
            Query(
                mention=phrase(1, 4),
                gold=gold,
                left_context=phrase(0, context),
                right_context=phrase(0, context),
                candidates=cands,
            )
        )
    return out


def _assert_same(a, b) -> None:
    assert a.features.keys() == b.features.keys()
    for k in a.features:
        assert a.features[k].dtype == b.features[k].dtype, k
        assert a.features[k].shape == b.features[k].shape, k
        assert torch.equal(a.features[k], b.features[k]), k
    assert torch.equal(a.candidate_mask, b.candidate_mask)
    assert torch.equal(a.labels, b.labels)
    assert a.meta == b.meta


def test_batches_equal_encode_on_random_subsets(kind: str, tiny) -> None:
    model = tiny(kind)
    queries = _random_queries(300, seed=1)  # more than one build chunk
    clear_cache()
    data = encoded_queries(model, queries)
    assert data is not None and len(data) == 300
    rng = random.Random(2)
    for _ in range(40):
        idx = rng.sample(range(300), rng.randint(1, 9))
        _assert_same(data.batch(idx), model.encode([queries[i] for i in idx]))


def test_mixed_datasets_collate_like_one_encode(kind: str, tiny) -> None:
    model = tiny(kind)
    a, b = _random_queries(20, seed=3), _random_queries(15, seed=4)
    da, db = encoded_queries(model, a), encoded_queries(model, b)
    got = collate([(da, 3), (db, 7), (da, 0), (db, 14)])
    _assert_same(got, model.encode([a[3], b[7], a[0], b[14]]))


def test_cache_hits_on_equal_content_and_misses_on_change(kind: str, tiny) -> None:
    model = tiny(kind)
    clear_cache()
    q = _random_queries(10, seed=5)
    first = encoded_queries(model, q)
    assert encoded_queries(model, list(_random_queries(10, seed=5))) is first
    changed = [*q[:-1], Query(q[-1].mention + " x", q[-1].gold, candidates=q[-1].candidates)]
    assert encoded_queries(model, changed) is not first
    # another vocabulary/config: another encoding
    other = tiny(kind, **({"max_name_length": 5} if kind == "cnn" else {"max_length": 40}))
    assert encoded_queries(other, q) is not first


def test_length_buckets_cover_every_query_once(kind: str, tiny) -> None:
    model = tiny(kind)
    # short texts: the tiny vocabulary is by character, long rows all hit the cap
    data = encoded_queries(model, _random_queries(103, seed=6, context=2))
    order = list(range(103))
    random.Random(0).shuffle(order)
    batches = length_buckets(order, data, 8, random.Random(1), span=4)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert all(1 <= len(b) <= 8 for b in batches)
    # within a window of span batches, widths are sorted: padding shrinks
    pad_sorted = sum(max(data.width(i) for i in b) * len(b) for b in batches)
    naive = [order[i : i + 8] for i in range(0, 103, 8)]
    pad_naive = sum(max(data.width(i) for i in b) * len(b) for b in naive)
    assert pad_sorted < pad_naive
