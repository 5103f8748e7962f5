"""Splits: determinism, the two rules, the filters, and train-only synonyms."""

from __future__ import annotations

from collections import Counter

import pytest
from data_helpers import synthetic_queries

from kronlink.data._text import normalize
from kronlink.data.builders._assemble import assemble_task
from kronlink.data.schema import Concept, Query
from kronlink.data.splits import (
    assign_split,
    filter_mentions,
    split_by_concept,
    split_by_mention,
    split_queries,
    train_synonyms,
    without_query_strings,
)


def test_assign_split_is_pinned():
    # The documented rule, pinned: sha256("0\x1fHP:0000003") -> u = 0.8916 -> dev.
    assert assign_split("HP:0000003", 0) == "dev"
    assert assign_split("HP:0000003", 0, (0.9, 0.05, 0.05)) == "train"
    assert assign_split("HP:0000003", 0, (0.0, 0.0, 1.0)) == "test"


@pytest.mark.parametrize("bad", [(0.5, 0.5), (0.8, 0.1, 0.2), (1.1, -0.1, 0.0)])
def test_assign_split_rejects_bad_fractions(bad):
    with pytest.raises(ValueError):
        assign_split("x", 0, bad)


@pytest.mark.parametrize("split_fn", [split_by_mention, split_by_concept])
def test_same_seed_same_splits_other_seed_other_splits(split_fn):
    queries = synthetic_queries()
    a = [q.split for q in split_fn(queries, seed=0)]
    b = [q.split for q in split_fn(list(reversed(queries)), seed=0)][::-1]
    c = [q.split for q in split_fn(queries, seed=1)]
    assert a == b  # independent of order: each query is placed on its own
    assert a != c
    counts = Counter(a)
    assert set(counts) == {"train", "dev", "test"}
    assert 0.7 < counts["train"] / len(a) < 0.9


def test_split_by_concept_has_no_concept_overlap():
    split = split_by_concept(synthetic_queries(), seed=3)
    golds = {s: {q.gold for q in split if q.split == s} for s in ("train", "dev", "test")}
    assert not golds["train"] & golds["test"]
    assert not golds["train"] & golds["dev"]
    assert not golds["dev"] & golds["test"]


def test_split_by_mention_shares_concepts_across_splits():
    split = split_by_mention(synthetic_queries(), seed=3)
    train = {q.gold for q in split if q.split == "train"}
    test = {q.gold for q in split if q.split == "test"}
    assert train & test  # the paper's setting


def test_split_queries_dispatches_and_refuses_unknown_rule():
    qs = synthetic_queries(20, 2)
    assert split_queries(qs, "concept", 0) == split_by_concept(qs, 0)
    assert split_queries(qs, "mention", 0) == split_by_mention(qs, 0)
    with pytest.raises(ValueError):
        split_queries(qs, "document", 0)


def test_filters_drop_what_design_excludes(ontology):
    queries = [
        Query("cystic  FIBROSIS", "C1"),  # own name, up to case and spaces
        Query("Asthma", "C1"),  # another concept's name
        Query("sugar disease", "C5"),  # links to two concepts
        Query("sugar disease", "C6"),
        Query("mucoviscidosis", "C1"),  # kept
        Query("Mucoviscidosis", "C1"),  # a repeat
        Query("renal shutdown", "C99"),  # not a concept
        Query("   ", "C2"),
    ]
    kept, report = filter_mentions(queries, ontology)
    assert [q.mention for q in kept] == ["mucoviscidosis", "Mucoviscidosis"]
    assert report.dropped == Counter(own_name=1, other_name=1, ambiguous=2, unknown_gold=1, empty=1)
    kept, report = filter_mentions(queries, ontology, dedupe=True)
    assert [q.mention for q in kept] == ["mucoviscidosis"]
    assert report.dropped["duplicate"] == 1
    assert report.as_dict()["kept"] == 1


def test_train_synonyms_hold_train_mentions_only():
    queries = [
        Query("a", "C1", split="train"),
        Query("b", "C1", split="test"),
        Query("A", "C1", split="train"),
        Query("c", "C2", split="dev"),
    ]
    assert train_synonyms(queries) == {"C1": ["a"]}


def _toy_task(rule: str, seed: int = 0):
    # Like HPO: some of the source's own synonyms are also used as mentions.
    concepts = [
        Concept(
            f"C{i}",
            f"condition number {i}",
            (f"given synonym {i}", f"surface {i} form 0"),
            definition=f"scope of {i}; surface {i} form 1",
        )
        for i in range(60)
    ]
    mentions = [Query(f"surface {i} form {j}", f"C{i}") for i in range(60) for j in range(4)]
    return assemble_task("toy", concepts, mentions, seed=seed, split_rule=rule, k=5, meta={})


@pytest.mark.parametrize("rule", ["mention", "concept"])
def test_index_and_ontology_hold_no_query_string(rule):
    task = _toy_task(rule)
    queries = {normalize(q.mention) for q in task.queries}
    assert {q.split for q in task.queries} == {"train", "dev", "test"}
    synonyms = {normalize(s) for c in task.concepts for s in c.synonyms}
    # The source's own synonyms stay, minus the ones used as queries (any split);
    # no train mention is folded in any more (issue 12, item 0).
    assert synonyms == {f"given synonym {i}" for i in range(60)}
    assert all(c.definition == f"scope of {c.id[1:]}" for c in task.concepts)
    assert not any(q in normalize(c.definition) for c in task.concepts for q in queries)
    assert all(q.gold_index() >= 0 for q in task.split("train"))
    assert all(len(q.candidates) == 5 for q in task.queries)
    if rule == "concept":
        train_golds = {q.gold for q in task.split("train")}
        assert not train_golds & {q.gold for q in task.split("test")}


def test_without_query_strings_against_a_brute_force_scan():
    concepts = [
        Concept("C1", "Asthma", ("Bronchial asthma", "ASTHMA attack"), "wheeze; Asthma  attack"),
        Concept("C2", "Gout", (), ""),
    ]
    queries = [Query("asthma attack", "C1", split="dev")]
    out = without_query_strings(concepts, queries)
    assert out[0] == Concept("C1", "Asthma", ("Bronchial asthma",), "wheeze")
    assert out[1] is concepts[1]  # untouched concepts are not copied


def test_assembled_task_is_deterministic():
    assert _toy_task("mention", 0) == _toy_task("mention", 0)
    assert _toy_task("mention", 0).queries != _toy_task("mention", 1).queries
