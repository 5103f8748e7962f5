"""Tiny rankers and synthetic queries shared by the model tests."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from kronlink.data.schema import Candidate, Query
from kronlink.models import Ranker, build_ranker

# Nothing in these tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Case table: kind -> overrides giving a tiny random model (no package folder).
TINY = {
    "transformer": {"encoder": None, "num_layers": 2, "max_length": 48},
    "cnn": {"tokenizer": None, "embedding_dim": 16, "channels": 16, "hidden_size": 16},
}


def _tiny_ranker(
    kind: str, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides
) -> Ranker:
    torch.manual_seed(seed)
    return build_ranker(kind, **{**TINY[kind], **overrides}).to(dtype).eval()


def _make_queries() -> list[Query]:
    """Three queries with 2, 4 and 3 candidates; contexts of different lengths."""
    return [
        Query(
            mention="heart attack",
            gold="I21",
            left_context="the patient had a severe",
            right_context="last week",
            candidates=(
                Candidate("I20", "angina pectoris"),
                Candidate("I21", "myocardial infarction"),
            ),
        ),
        Query(
            mention="fever",
            gold="R50",
            left_context="admitted with a high",
            right_context="and cough for three days, later pneumonia was diagnosed",
            candidates=(
                Candidate("R05", "cough"),
                Candidate("R50", "fever of other and unknown origin"),
                Candidate("J18", "pneumonia, unspecified organism"),
                Candidate("R68", "other general symptoms and signs"),
            ),
        ),
        Query(
            mention="sugar",
            gold=None,
            candidates=(
                Candidate("E11", "type 2 diabetes"),
                Candidate("E10", "type 1 diabetes"),
                Candidate("E16", "hypoglycemia"),
            ),
        ),
    ]


@pytest.fixture(params=sorted(TINY))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def queries() -> list[Query]:
    return _make_queries()


@pytest.fixture
def tiny() -> Callable[..., Ranker]:
    """``tiny(kind, seed=0, dtype=float64, **overrides)``: a tiny ranker in eval mode."""
    return _tiny_ranker


@pytest.fixture
def make_queries() -> Callable[[], list[Query]]:
    return _make_queries
