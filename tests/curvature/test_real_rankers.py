"""The estimator on the library's own rankers (tiny random configs): every
trainable parameter is covered, and the diagonal Fisher equals a loop over
single queries' squared gradients."""

from __future__ import annotations

import os

import pytest
import torch
from test_estimate import BRUTE, per_example_grads, rel

import kronlink.models as models
from kronlink.curvature import estimate_curvature
from kronlink.data.schema import Candidate, Query

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = {
    "transformer": {"encoder": None, "num_layers": 2, "max_length": 48},
    "cnn": {"tokenizer": None, "embedding_dim": 8, "channels": 8, "hidden_size": 8},
}

QUERIES = [
    Query(
        "heart attack",
        "I21",
        "the patient had a severe",
        "last week",
        (Candidate("I20", "angina pectoris"), Candidate("I21", "myocardial infarction")),
    ),
    Query(
        "fever",
        "R50",
        "admitted with a high",
        "and cough for three days",
        (
            Candidate("R05", "cough"),
            Candidate("R50", "fever of other and unknown origin"),
            Candidate("J18", "pneumonia, unspecified organism"),
        ),
    ),
    Query(
        "sugar",
        "E10",
        "",
        "",
        (Candidate("E11", "type 2 diabetes"), Candidate("E10", "type 1 diabetes")),
    ),
]


@pytest.mark.parametrize("kind", sorted(TINY))
def test_real_ranker_diag_matches_loop(kind: str) -> None:
    torch.manual_seed(0)
    model = models.build_ranker(kind, **TINY[kind]).double().eval()
    batch = model.encode(QUERIES)
    state = estimate_curvature(model, [batch], kinds=("kfac", "diag"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state.diag) == trainable
    grads = per_example_grads(model, [batch])
    assert state.n_examples == len(grads) == 3
    worst = max(
        rel(d, sum(g[n].square() for g in grads) / len(grads)) for n, d in state.diag.items()
    )
    assert worst < BRUTE, worst
