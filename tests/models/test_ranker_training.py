"""A few SGD steps on a tiny synthetic ranking problem lower the loss."""

from __future__ import annotations

import itertools
import random

import torch

from kronlink.data.schema import Candidate, Query
from kronlink.models import ranking_loss

WORDS = ["fever", "cough", "rash", "anemia", "asthma", "gout", "angina", "sepsis", "otitis", "acne"]


def synthetic_queries(n: int, seed: int = 0) -> list[Query]:
    """The gold candidate's name is the mention; 2 to 4 distractors."""
    rng = random.Random(seed)
    queries = []
    for _ in range(n):
        gold, *others = rng.sample(WORDS, rng.randint(3, 5))
        names = [gold, *others]
        rng.shuffle(names)
        queries.append(
            Query(
                mention=gold,
                gold=gold,
                left_context="patient with",
                candidates=tuple(Candidate(w, w) for w in names),
            )
        )
    return queries


def _losses(model, optimizer, steps: int) -> list[float]:
    batch = model.encode(synthetic_queries(16))
    out = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ranking_loss(model(batch), batch.candidate_mask, batch.labels)
        loss.backward()
        optimizer.step()
        out.append(loss.item())
    return out


def test_sgd_steps_reduce_the_loss(kind: str, tiny) -> None:
    """Plain gradient steps go downhill: the gradients are the loss's."""
    model = tiny(kind, dropout=0.0).train()
    losses = _losses(model, torch.optim.SGD(model.parameters(), lr=0.05), steps=6)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


def test_adam_fits_the_synthetic_task(kind: str, tiny) -> None:
    """The model can learn "the gold name is the mention" from 16 queries.
    (Tiny random inits give SGD very small gradients; Adam rescales them.)"""
    model = tiny(kind, dtype=torch.float32, dropout=0.0).train()
    losses = _losses(model, torch.optim.Adam(model.parameters(), lr=1e-2), steps=40)
    assert losses[-1] < 0.5 * losses[0], losses
