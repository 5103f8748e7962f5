"""The training loop: it learns, keeps the best dev checkpoint, applies hooks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kronlink import training
from kronlink.data.schema import Candidate, Query
from kronlink.errors import ConfigError
from kronlink.evaluation import evaluate
from kronlink.models import build_ranker
from kronlink.models.dataset import collate, encoded_queries
from kronlink.strategies import layer_depths, lrc_param_groups
from kronlink.training import TrainConfig, train

NAMES = ["fever", "cough", "asthma", "angina", "anemia", "gout", "rash", "migraine"]


def _queries(n: int, seed: int) -> list[Query]:
    """Mention = the gold name with a typo-free suffix; 4 candidates each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randperm(len(NAMES), generator=g)[:4].tolist()
        cands = tuple(Candidate(NAMES[i], NAMES[i]) for i in idx)
        gold = cands[int(torch.randint(4, (1,), generator=g))].id
        out.append(Query(mention=f"{gold} noted", gold=gold, candidates=cands, split="train"))
    return out


def test_training_learns_and_restores_best_dev() -> None:
    torch.manual_seed(0)
    model = build_ranker(
        "cnn", tokenizer=None, embedding_dim=32, channels=32, hidden_size=32, dropout=0.0
    )
    tr, dev = _queries(96, 1), _queries(48, 2)
    before = evaluate(model, dev).accuracy
    seen = []
    result = train(
        model,
        tr,
        dev,
        TrainConfig(epochs=8, batch_size=16, lr=3e-3, evals_per_epoch=1),
        on_progress=seen.append,
    )
    after = evaluate(model, dev)
    assert after.accuracy > max(before + 0.3, 0.8)
    # the model left in place is the best dev checkpoint, not the last one
    assert result.best_dev is not None
    assert after.accuracy == pytest.approx(result.best_dev.accuracy)
    assert max(h["dev_accuracy"] for h in result.history) == pytest.approx(after.accuracy)
    assert [p.step for p in seen] == list(range(1, result.steps + 1))
    assert result.steps == 8 * 6


def test_penalty_hook_is_added_to_the_loss() -> None:
    """A penalty that dominates the task loss decides the direction of every
    step: with a linear pull (gradient +lam everywhere) Adam lowers every weight
    by about lr a step, and the reported penalty is its value."""
    torch.manual_seed(0)
    model = build_ranker("cnn", tokenizer=None, embedding_dim=8, channels=8, hidden_size=8)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    lam, lr = 1e4, 1e-3

    def pull(m: torch.nn.Module) -> torch.Tensor:
        return lam * sum(p.sum() for p in m.parameters())

    seen = []
    cfg = TrainConfig(
        epochs=2, batch_size=16, lr=lr, head_lr=None, warmup=0, grad_clip=0, weight_decay=0
    )
    res = train(model, _queries(32, 3), (), cfg, penalty=pull, on_progress=seen.append)
    assert res.steps == 4
    # linear decay of the rate over 4 steps: 1, 3/4, 1/2, 1/4 of lr
    expected = lr * (1 + 0.75 + 0.5 + 0.25)
    for n, p in model.named_parameters():
        moved = (start[n] - p.detach()).flatten()
        assert torch.all(moved > 0.9 * expected), n
        assert torch.all(moved < 1.1 * expected), n
    assert seen[0].penalty == pytest.approx(
        lam * sum(float(v.sum()) for v in start.values()), rel=1e-4
    )


def test_should_stop_cancels_between_steps() -> None:
    model = build_ranker("cnn", tokenizer=None, embedding_dim=8, channels=8, hidden_size=8)
    calls = []
    res = train(
        model,
        _queries(64, 4),
        (),
        TrainConfig(epochs=3, batch_size=8),
        should_stop=lambda: len(calls) >= 3 or bool(calls.append(1)),
    )
    assert res.stopped and res.steps == 3


def test_bad_training_sets_are_refused() -> None:
    model = build_ranker("cnn", tokenizer=None)
    with pytest.raises(ConfigError, match="no queries"):
        train(model, [], ())
    q = Query(mention="x", gold="Z", candidates=(Candidate("A", "a"),), split="train")
    with pytest.raises(ConfigError, match="not among its candidates"):
        train(model, [q], ())
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)


def test_lrc_rates_fall_by_gamma_towards_the_input() -> None:
    model = build_ranker("transformer", encoder=None, num_layers=2)
    depths = layer_depths(model)
    assert depths["encoder.embeddings.word_embeddings.weight"] == 0
    assert depths["encoder.encoder.layer.1.output.dense.weight"] == 2
    assert depths["head.weight"] == 3
    groups = lrc_param_groups(0.5)(model, 1e-3)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 / 8, 1e-3 / 4, 1e-3 / 2, 1e-3])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_replay_mixes_old_queries_into_every_batch(monkeypatch) -> None:
    model = build_ranker("cnn", tokenizer=None, embedding_dim=8, channels=8, hidden_size=8)
    new, old = _queries(32, 5), [replace(q, mention=f"old {q.mention}") for q in _queries(20, 6)]
    old_data = encoded_queries(model, old)
    seen: list[list[bool]] = []

    def spy(picks):
        seen.append([data is old_data for data, _ in picks])
        return collate(picks)

    # batches come from the tokenised-query cache, one collate per step
    monkeypatch.setattr(training, "collate", spy)
    cfg = TrainConfig(epochs=1, batch_size=8, replay_per_batch=3)
    train(model, new, (), cfg, replay=old)
    assert len(seen) == 4
    for from_old in seen:
        assert len(from_old) == 11
        assert sum(from_old) == 3


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_cached_tensors_train_exactly_like_encoding_every_step(kind: str, monkeypatch) -> None:
    tiny = (
        {"tokenizer": None, "embedding_dim": 8, "channels": 8, "hidden_size": 8}
        if kind == "cnn"
        else {"encoder": None, "num_layers": 1}
    )
    new, old = _queries(24, 7), _queries(10, 8)
    cfg = TrainConfig(epochs=2, batch_size=5, replay_per_batch=2, lr=1e-3)
    weights = []
    for cached in (True, False):
        torch.manual_seed(0)
        model = build_ranker(kind, **tiny)
        if not cached:  # the per-step model.encode path
            monkeypatch.setattr(training, "encoded_queries", lambda m, q: None)
        train(model, new, new[:6], cfg, replay=old)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
