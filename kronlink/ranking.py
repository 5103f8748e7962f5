"""The scores a ranker's answers are ordered by: the model's, plus an exact-name prior.

Serving (``service.holder.LoadedModel.score``) and evaluation
(``kronlink.evaluation.evaluate`` / ``score_queries``) both call
:func:`rank_scores`, so the served order and the measured order are the same.

The rule (issue 12, item 3): a candidate whose name equals the mention after
:func:`~kronlink.data._text.name_keys` (normalised; "Anemia, unspecified"
also matches "anemia") or, when the caller knows it, whose stored synonym
does, ranks first unless the model has strong evidence against
it. Its score, a logit of the ranker's softmax over candidates, is raised by
``exact_margin``: another candidate stays above the exact match only when the
model scores it more than ``exact_margin`` higher, i.e. when the model's
probability for it is more than ``exp(exact_margin)`` times the exact
match's. The probabilities reported are the softmax of the adjusted scores,
so they stay consistent with the order (a prior of ``exact_margin`` nats on
the exact match, not a post-hoc swap).

Why it is needed: the task builders drop every query whose mention equals its
concept's name (right for measuring generalisation), so a ranker trained on
them never sees an exact name as a positive and puts "Asthma" below
"Aspirin-induced asthma" for "asthma" (LESSONS.md).

``exact_margin = 0`` is the model alone (the research experiments use it, so
their stored records keep their meaning).

A second, per-version term (kronlink.retrieval_prior): ``beta * -log(1 +
rank)`` on each candidate's position in the retriever's order, with ``beta``
fitted on the dev split by the update job. It is applied only where the caller
passes ``retrieval_prior`` and the queries' ``retrieval_ranks`` (serving:
generated candidates; the job's evaluation), never in training.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from kronlink.data._text import name_keys, normalize
from kronlink.data.schema import Query
from kronlink.models.base import Ranker, RankerBatch
from kronlink.retrieval_prior import RetrievalPrior, prior_bonus
from kronlink.settings import DEFAULT_EXACT_MARGIN

__all__ = ["DEFAULT_EXACT_MARGIN", "apply_exact_prior", "exact_mask", "rank_scores"]

# DEFAULT_EXACT_MARGIN (kronlink.settings, the ``exact_margin`` setting): 5 nats,
# the log odds that a source synonym equal to a concept's name names that
# concept: 1,047 of 1,054 HPO synonyms and ICD-10-CM inclusion terms that equal
# a name do (ln(1047/7) = 5.0; bench/exact_margin.py, "source_prior" in
# results/clinical/exact_margin.json). The model must then give another
# candidate more than e^5 ~ 150 times the exact match's probability to keep it
# first. It is taken from the ontologies, not tuned on the clinical list.


def exact_mask(
    queries: Sequence[Query],
    width: int,
    exact_ids: Sequence[Collection[str] | None] | None = None,
) -> Tensor:
    """(len(queries), width) bool: True where a candidate is an exact match.

    A candidate matches when the mention equals one of its name's
    :func:`~kronlink.data._text.name_keys` (the name normalised, and without
    ICD-10-CM's trailing ", unspecified"), or when its id is in ``exact_ids[i]`` (the ids the retriever matched by a
    stored synonym; a candidate carries only its name)."""
    out = torch.zeros((len(queries), width), dtype=torch.bool)
    for i, q in enumerate(queries):
        key = normalize(q.mention)
        ids = exact_ids[i] if exact_ids is not None else None
        for j, c in enumerate(q.candidates or ()):
            if j < width and ((ids is not None and c.id in ids) or key in name_keys(c.name)):
                out[i, j] = True
    return out


def apply_exact_prior(
    scores: Tensor, candidate_mask: Tensor, exact: Tensor, margin: float
) -> Tensor:
    """``scores`` with ``margin`` added to every real exact-match candidate."""
    if margin < 0:
        raise ValueError(f"exact_margin must be >= 0, got {margin}")
    if margin == 0:
        return scores
    bonus = (exact.to(scores.device) & candidate_mask).to(scores.dtype) * margin
    return scores + bonus


def rank_scores(
    model: Ranker,
    queries: Sequence[Query],
    *,
    exact_margin: float,
    exact_ids: Sequence[Collection[str] | None] | None = None,
    batch: RankerBatch | None = None,
    retrieval_prior: RetrievalPrior | None = None,
    retrieval_ranks: Sequence[Sequence[int] | None] | None = None,
) -> tuple[Tensor, RankerBatch]:
    """Encode ``queries`` (unless ``batch``, their batch already encoded, e.g.
    from the tokenised-query cache, is given), score them with ``model`` and
    apply the exact-name prior, then the retrieval prior where both
    ``retrieval_prior`` and ``retrieval_ranks`` (per query its candidates'
    retriever positions, None for a query whose candidates were not retrieved)
    are given.

    Returns the (B, C) float scores answers are ordered by, and the batch
    (its ``candidate_mask`` and ``labels``). Call under ``torch.no_grad`` or
    ``inference_mode``."""
    if batch is None:
        batch = model.encode(queries)
    batch = batch.to(model.device)
    scores = model(batch).float()
    if exact_margin:
        exact = exact_mask(queries, scores.shape[1], exact_ids)
        scores = apply_exact_prior(scores, batch.candidate_mask, exact, exact_margin)
    if retrieval_prior is not None and retrieval_ranks is not None and retrieval_prior.beta:
        if len(retrieval_ranks) != len(queries):
            raise ValueError(
                f"retrieval_ranks: one row per query expected, {len(queries)} queries, "
                f"{len(retrieval_ranks)} rows"
            )
        bonus = prior_bonus(retrieval_ranks, scores.shape[1], retrieval_prior.beta, scores.dtype)
        scores = scores + bonus.to(scores.device) * batch.candidate_mask
    return scores, batch
