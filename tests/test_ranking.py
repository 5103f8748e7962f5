"""The exact-name prior (kronlink/ranking.py, issue 12 item 3) on a constructed
ranker whose scores are known: a subtype the model prefers by less than the
margin yields to the exact name; one it prefers by more keeps its place. The
same model goes through evaluation (``evaluate``, ``score_queries``) and
through serving's ``rank_items`` over a real Retriever, which must agree."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
import torch
from torch import nn

from kronlink.data._text import name_keys
from kronlink.data.schema import Candidate, Concept, Query
from kronlink.evaluation import evaluate, score_queries
from kronlink.models.base import Ranker, RankerBatch
from kronlink.ranking import DEFAULT_EXACT_MARGIN, apply_exact_prior, exact_mask
from kronlink.registry.records import OntologyInfo
from kronlink.retrieval import Retriever
from kronlink.settings import Settings


class TableRanker(Ranker):
    """Scores a candidate by its name, from a fixed table (the "model's evidence")."""

    kind = "table"

    def __init__(self, table: dict[str, float]) -> None:
        super().__init__()
        self.table = table
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def encode(self, queries):
        width = max(len(q.candidates or ()) for q in queries)
        scores = torch.zeros((len(queries), width))
        mask = torch.zeros((len(queries), width), dtype=torch.bool)
        for i, q in enumerate(queries):
            for j, c in enumerate(q.candidates or ()):
                scores[i, j], mask[i, j] = self.table[c.name], True
        labels = torch.tensor([q.gold_index() for q in queries])
        return RankerBatch({"scores": scores}, mask, labels)

    def forward(self, batch: RankerBatch) -> torch.Tensor:
        return batch.features["scores"] + self.anchor


# "asthma": the model prefers the subtype by 1.5 (< 5: the exact name wins).
# "fever": it prefers "Intrapartum fever" by 6.0 (> 5: its evidence stands).
TABLE = {
    "Exercise-induced asthma": 2.0,
    "Asthma": 0.5,
    "Cough": -1.0,
    "Intrapartum fever": 6.5,
    "Fever": 0.5,
    "Pruritus": 0.0,
    "Pruritus ani": 1.0,
}
ASTHMA = Query(
    "asthma",
    gold="HP:2",
    candidates=(
        Candidate("HP:1", "Exercise-induced asthma"),
        Candidate("HP:2", "Asthma"),
        Candidate("HP:3", "Cough"),
    ),
)
FEVER = Query(
    "Fever ",  # normalised: case and spaces do not matter
    gold="HP:5",
    candidates=(Candidate("HP:4", "Intrapartum fever"), Candidate("HP:5", "Fever")),
)


def test_the_default_setting_is_the_rankings_default():
    assert Settings().exact_margin == DEFAULT_EXACT_MARGIN == 5.0


def test_name_keys_drop_icds_plain_unspecified_suffix_only():
    assert name_keys("Anemia, unspecified") == {"anemia, unspecified", "anemia"}
    assert name_keys(" Asthma ") == {"asthma"}
    # a qualified "unspecified" still names something more specific
    assert name_keys("Otitis media, unspecified ear") == {"otitis media, unspecified ear"}
    assert name_keys(", unspecified") == {", unspecified"}
    unspecified = Query(
        "anemia", gold=None, candidates=(Candidate("D64.9", "Anemia, unspecified"),)
    )
    assert exact_mask([unspecified], 1).tolist() == [[True]]
    r = Retriever(
        [Concept("D50", "Iron deficiency anemia"), Concept("D64.9", "Anemia, unspecified")]
    )
    assert r.search(["Anemia"], 1)[0][0][0] == "D64.9"


def test_name_keys_follow_icd_conventions():
    # nonessential modifiers in parentheses may be present or absent
    assert name_keys("Hypertension (arterial) (benign)") == {
        "hypertension (arterial) (benign)",
        "hypertension",
    }
    # a bracketed alternative wording is a name of its own
    assert name_keys("Acute nasopharyngitis [common cold]") == {
        "acute nasopharyngitis [common cold]",
        "acute nasopharyngitis",
        "common cold",
    }
    # NOS marks the plain term, after the modifiers go too
    assert name_keys("Sore throat (acute) NOS") == {
        "sore throat (acute) nos",
        "sore throat nos",
        "sore throat (acute)",
        "sore throat",
    }
    assert name_keys("Unspecified atrial fibrillation") >= {"atrial fibrillation"}
    assert name_keys("Pneumonia, unspecified organism") >= {"pneumonia"}
    assert name_keys("Urinary tract infection, site not specified") >= {"urinary tract infection"}
    # nothing empty, and words that only look like a convention stay
    assert name_keys("(x)") == {"(x)"}
    assert name_keys("NOS") == {"nos"}
    assert name_keys("Nosebleed") == {"nosebleed"}
    assert name_keys("Unspecified") == {"unspecified"}


def test_exact_mask_matches_normalised_names_and_given_synonym_ids():
    m = exact_mask([ASTHMA, FEVER], 3)
    assert m.tolist() == [[False, True, False], [False, True, False]]
    with_ids = exact_mask([ASTHMA], 3, [frozenset({"HP:3"})])
    assert with_ids.tolist() == [[False, True, True]]


@pytest.mark.parametrize(
    ("margin", "asthma_rank", "fever_rank"),
    [(0.0, 2, 2), (1.0, 2, 2), (DEFAULT_EXACT_MARGIN, 1, 2), (7.0, 1, 1)],
)
def test_evaluation_ranks_the_exact_name_first_unless_the_model_is_sure(
    margin, asthma_rank, fever_rank
):
    model = TableRanker(TABLE)
    acc = {(1, 1): 1.0, (1, 2): 0.5, (2, 1): 0.5, (2, 2): 0.0}[(asthma_rank, fever_rank)]
    assert evaluate(model, [ASTHMA, FEVER], exact_margin=margin).accuracy == acc
    assert evaluate(model, [ASTHMA], exact_margin=margin).mrr == 1 / asthma_rank
    assert evaluate(model, [FEVER], exact_margin=margin).mrr == 1 / fever_rank


def test_probabilities_are_the_softmax_of_the_adjusted_scores():
    rows = score_queries(TableRanker(TABLE), [ASTHMA], exact_margin=3.0)[0]
    adjusted = [2.0, 0.5 + 3.0, -1.0]
    z = sum(math.exp(a) for a in adjusted)
    for (_, score, prob), a in zip(rows, adjusted, strict=True):
        assert score == pytest.approx(a)
        assert prob == pytest.approx(math.exp(a) / z, rel=1e-6)


def test_apply_exact_prior_refuses_a_negative_margin_and_ignores_padding():
    scores = torch.tensor([[1.0, 0.0]])
    with pytest.raises(ValueError, match="exact_margin"):
        apply_exact_prior(scores, torch.ones_like(scores, dtype=torch.bool), scores > 0, -1.0)
    padded = apply_exact_prior(
        scores, torch.tensor([[True, False]]), torch.tensor([[False, True]]), 3.0
    )
    assert padded.tolist() == [[1.0, 0.0]]


def test_serving_ranks_as_evaluation_does_and_counts_stored_synonyms():
    from service.batching import LinkItem, rank_items
    from service.holder import LoadedModel
    from service.ontologies import OntologyIndex

    concepts = [
        Concept("HP:1", "Exercise-induced asthma"),
        Concept("HP:2", "Asthma"),
        Concept("HP:3", "Cough"),
        Concept("HP:6", "Pruritus", synonyms=("itching",)),
        Concept("HP:7", "Pruritus ani", synonyms=("anal itching",)),
    ]
    info = OntologyInfo(1, "toy", None, len(concepts), datetime.now(UTC))
    index = OntologyIndex(info, Retriever(concepts), {c.id: c for c in concepts})
    model = LoadedModel(version=None, ranker=TableRanker(TABLE))  # type: ignore[arg-type]
    items = [
        LinkItem("asthma", candidates=ASTHMA.candidates),  # given candidates: names only
        LinkItem("itching", index=index, k=2),  # generated: the synonym counts
    ]
    plain = rank_items(model, items, 8, exact_margin=0.0)
    assert [r[0]["id"] for r in plain] == ["HP:1", "HP:7"]
    served = rank_items(model, items, 8, exact_margin=3.0)
    assert [r[0]["id"] for r in served] == ["HP:2", "HP:6"]
    assert served[0][0]["score"] == pytest.approx(3.5)
    # the same order evaluation measures for the given-candidates query
    assert evaluate(TableRanker(TABLE), [ASTHMA], exact_margin=3.0).accuracy == 1.0


def test_the_update_request_refuses_a_negative_margin():
    from kronlink.errors import ConfigError
    from kronlink.update import UpdateRequest

    assert UpdateRequest(method="none", lambdas=0.0).exact_margin == 0.0  # the model alone
    with pytest.raises(ConfigError, match="exact_margin"):
        UpdateRequest(method="none", lambdas=0.0, exact_margin=-1.0)
