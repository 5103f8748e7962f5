"""The retriever's query tower: the shipped encoder's vectors when untuned,
scores and curvature against brute-force recomputation on fresh random
inputs, and tuning that learns without moving the concept side."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import BertConfig

from kronlink.curvature import TaskState, estimate_curvature
from kronlink.data.schema import Concept, Query
from kronlink.errors import CheckpointError, ConfigError
from kronlink.models.base import ranking_loss
from kronlink.penalties import build_penalty
from kronlink.retrieval import DenseIndex, Retriever
from kronlink.retrieval.dense import Encoder
from kronlink.retrieval.tower import QueryTower, TuneConfig, recall_at, tune

NAMES = ["Hypertension", "Asthma", "Fever", "Cough", "Headache", "Migraine", "Anemia", "Gout"]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder()


def _tiny_tower(seed: int) -> QueryTower:
    """A random 2-layer BERT on MiniLM's vocabulary: fast enough for per-query loops."""
    from kronlink.models._text import DEFAULT_ENCODER, resolve_source

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return QueryTower(cfg, resolve_source(DEFAULT_ENCODER), base="tiny@0", scale=5.0).double()


def _random_bank(seed: int, concepts: int, dim: int, base: str) -> DenseIndex:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 4, size=concepts)  # 1 to 3 entries a concept
    vectors = rng.standard_normal((int(counts.sum()), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return DenseIndex(vectors, starts, [f"C{i}" for i in range(concepts)], base)


def test_an_untuned_tower_gives_the_shipped_encoders_vectors(encoder: Encoder) -> None:
    texts = ["high blood pressure", "Essential (primary) hypertension", "fits", "a" * 300]
    tower = QueryTower.build()
    np.testing.assert_allclose(
        tower.query_encoder().encode(texts), encoder.encode(texts), atol=1e-6
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_are_the_scaled_best_cosine_over_a_concepts_entries(seed: int) -> None:
    tower = _tiny_tower(seed)
    bank = _random_bank(seed, 7, 16, "tiny@0")
    tower.set_bank(bank)
    mentions = ["left knee pain", "fever", "short of breath at night"]
    batch = tower.encode([Query(mention=m, gold="C1") for m in mentions])
    scores = tower(batch)
    q = tower.embed(batch.features["input_ids"], batch.features["attention_mask"]).detach()
    vec = torch.from_numpy(bank.vectors).double()
    ends = [*bank.starts[1:].tolist(), len(vec)]
    brute = torch.stack(
        [
            torch.stack([(q[b] @ vec[s:e].T).max() for s, e in zip(bank.starts, ends, strict=True)])
            for b in range(len(mentions))
        ]
    )
    torch.testing.assert_close(scores.detach(), tower.scale * brute)


@pytest.mark.parametrize("seed", [3, 4])
def test_the_towers_diagonal_fisher_equals_per_query_gradients(seed: int) -> None:
    """estimate_curvature on the tower (token layouts, the full-softmax label,
    a bank with several entries a concept) against a loop over queries."""
    tower = _tiny_tower(seed)
    tower.set_bank(_random_bank(seed, 9, 16, "tiny@0"))
    rng = random.Random(seed)
    words = "pain fever cough left right chronic acute swelling of the knee".split()
    queries = [
        Query(mention=" ".join(rng.sample(words, rng.randint(1, 5))), gold=f"C{rng.randrange(9)}")
        for _ in range(6)
    ]
    batches = [tower.encode(queries[:4]), tower.encode(queries[4:])]
    state = estimate_curvature(tower, batches, kinds=("diag",), fisher="empirical")
    brute = {n: torch.zeros_like(p) for n, p in tower.named_parameters()}
    for q in queries:
        tower.zero_grad()
        b = tower.encode([q])
        ranking_loss(tower(b), b.candidate_mask, b.labels, reduction="sum").backward()
        for n, p in tower.named_parameters():
            brute[n] += p.grad**2 / len(queries)
    for name in (
        "encoder.encoder.layer.1.output.dense.weight",
        "encoder.embeddings.LayerNorm.weight",
    ):
        got = state.diag[name].double()
        torch.testing.assert_close(got, brute[name], rtol=1e-4, atol=1e-10)


def test_tuning_learns_lay_mentions_and_the_penalty_holds_the_anchor(encoder: Encoder) -> None:
    concepts = [Concept(f"C{i}", n, ()) for i, n in enumerate(NAMES)]
    bank = DenseIndex.build(concepts, encoder)
    # made-up lay words MiniLM cannot know: only training can link them
    lay = ["blorp", "wheezle", "hotbod", "barkle", "skullache", "flashhead", "paleblood", "toefire"]
    train = [Query(mention=m, gold=f"C{i}") for i, m in enumerate(lay)]
    tower = QueryTower.build().set_bank(bank)
    before = recall_at(tower, train, (1,))["1"]
    cfg = TuneConfig(epochs=5, batch_size=8, lr=3e-4, warmup=0.0, eval_k=1)
    res = tune(tower, train, train, cfg)
    after = recall_at(tower, train, (1,))["1"]
    assert res.best_dev == after > before + 0.3, (before, after)
    # the concept side never moves: the index is still the shipped encoder's
    np.testing.assert_array_equal(tower.bank.numpy(), bank.vectors)

    # The penalty: task A is the lay mentions with their right concepts, at
    # the untuned tower (unsure there, so its Fisher is not ~0); the update
    # teaches the same words the wrong concepts. A's loss must rise far less
    # under a strong KFC penalty than without one.
    wrong = [Query(mention=m, gold=f"C{(i + 3) % len(lay)}") for i, m in enumerate(lay)]

    def loss_on_a(model: QueryTower) -> float:
        b = model.encode(train)
        with torch.no_grad():
            return float(ranking_loss(model(b), b.candidate_mask, b.labels))

    base = QueryTower.build().set_bank(bank)
    curvature = estimate_curvature(
        base,
        [base.encode(train)],
        kinds=("kfac",),
        fisher="true",
        generator=torch.Generator().manual_seed(0),
    )
    state = TaskState.from_model(base, curvature)
    start = loss_on_a(base)
    # Adam moves every weight by about lr a step whatever the penalty, and
    # its momentum carries the first steps on: the penalty shows over steps
    long = TuneConfig(epochs=20, batch_size=8, lr=3e-4, warmup=0.0)
    free = QueryTower.build().set_bank(bank)
    tune(free, wrong, (), long)
    pinned = QueryTower.build().set_bank(bank)
    tune(pinned, wrong, (), long, penalty=build_penalty("kfc-expand", [state], 1e3))
    rise_free, rise_pinned = loss_on_a(free) - start, loss_on_a(pinned) - start
    assert rise_free > 1.0 and rise_pinned < 0.5 * rise_free, (start, rise_free, rise_pinned)


def test_tuning_never_returns_a_tower_worse_on_dev(encoder: Encoder) -> None:
    concepts = [Concept(f"C{i}", n, ()) for i, n in enumerate(NAMES)]
    tower = QueryTower.build().set_bank(DenseIndex.build(concepts, encoder))
    dev = [Query(mention=n.lower(), gold=f"C{i}") for i, n in enumerate(NAMES)]
    start = recall_at(tower, dev, (1,))["1"]
    # training that teaches every mention the wrong concept
    wrong = [Query(mention=n.lower(), gold=f"C{(i + 1) % len(NAMES)}") for i, n in enumerate(NAMES)]
    res = tune(tower, wrong, dev, TuneConfig(epochs=4, batch_size=4, lr=3e-4, warmup=0.0, eval_k=1))
    assert res.start_dev == start == 1.0
    assert recall_at(tower, dev, (1,))["1"] == start


def test_a_tower_saves_loads_and_serves_a_retriever(tmp_path, encoder: Encoder) -> None:
    concepts = [Concept(f"C{i}", n, ()) for i, n in enumerate(NAMES)]
    bank = DenseIndex.build(concepts, encoder)
    tower = QueryTower.build().set_bank(bank)
    with torch.no_grad():
        tower.encoder.encoder.layer[0].output.dense.weight.mul_(1.5)  # a tuned tower differs
    tower.save(tmp_path / "t")
    back = QueryTower.load(tmp_path / "t").set_bank(bank)
    texts = ["high temperature", "wheezing"]
    np.testing.assert_array_equal(
        back.query_encoder().encode(texts), tower.query_encoder().encode(texts)
    )
    assert not np.allclose(back.query_encoder().encode(texts), encoder.encode(texts), atol=1e-4)
    r = Retriever(concepts, mode="fused", dense=bank, encoder=back.query_encoder())
    assert r.search(["Asthma"], 3)[0][0][0] == "C1"  # exact names first, as ever


def test_bad_inputs_are_refused_clearly(tmp_path, encoder: Encoder) -> None:
    tower = QueryTower.build()
    with pytest.raises(ConfigError, match="no bank"):
        tower.encode([Query(mention="x", gold="C0")])
    other = DenseIndex(np.eye(3, 384, dtype=np.float32), np.arange(3), ["a", "b", "c"], "other@1")
    with pytest.raises(ConfigError, match="rebuild the index"):
        tower.set_bank(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="cannot read a query tower"):
        QueryTower.load(tmp_path / "empty")
