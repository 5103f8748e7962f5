"""The real-task builders on a small ``limit``: shape and leakage checks."""

from __future__ import annotations

from functools import cache

import pytest

from kronlink.data._text import normalize
from kronlink.data.builders import BUILDERS, build_task
from kronlink.data.io import load_task, save_task
from kronlink.data.schema import Task

LIMIT = 400
K = 10


@cache
def built(name: str, split_rule: str = "mention", seed: int = 0) -> Task:
    # Each build parses the whole source file (seconds): build each variant once.
    return build_task(name, seed=seed, split_rule=split_rule, k=K, limit=LIMIT)


@pytest.mark.parametrize(("name", "min_concepts"), [("icd10cm", 40000), ("hpo", 15000)])
def test_builder_sanity(name, min_concepts):
    task = built(name)
    assert task.name == name
    assert len(task.concepts) >= min_concepts  # the ontology is never cut by limit
    assert len({c.id for c in task.concepts}) == len(task.concepts)
    assert 0 < len(task.queries) <= LIMIT
    assert {q.split for q in task.queries} == {"train", "dev", "test"}
    names = {c.id: normalize(c.name) for c in task.concepts}
    all_names = set(names.values())
    for q in task.queries:
        assert len(q.candidates) == K
        assert normalize(q.mention) != names[q.gold]
        assert normalize(q.mention) not in all_names
    assert all(q.gold_index() >= 0 for q in task.split("train"))
    assert task.meta["filter"]["kept"] == len(task.queries)


@pytest.mark.parametrize("name", ["icd10cm", "hpo"])
def test_no_query_string_in_the_ontology(name):
    task = built(name)
    queries = {normalize(q.mention) for q in task.queries}
    synonyms = {normalize(s) for c in task.concepts for s in c.synonyms}
    parts = {normalize(p) for c in task.concepts for p in (c.definition or "").split("; ")}
    assert not synonyms & queries and not parts & queries
    assert task.meta["synonyms"] == "source_minus_queries"


HPO_WITH_CANARY = """format-version: 1.2

[Term]
id: HP:0000001
name: All

[Term]
id: HP:0001250
name: Seizure
def: "A seizure is an intermittent abnormality of nervous system physiology." []
synonym: "Epileptic seizure" EXACT []
synonym: "Seizures {plant}" EXACT []
synonym: "fits {plant}" RELATED []
is_a: HP:0000001

[Term]
id: HP:0002315
name: Headache
synonym: "Cephalgia" EXACT []
synonym: "head pain {plant}" EXACT []
is_a: HP:0000001
"""


def test_a_canary_in_an_ontology_synonym_reaches_no_artifact_or_index(tmp_path):
    """The mentions of HPO and ICD-10-CM *are* ontology synonyms: a string planted
    in one must end up in queries.jsonl only, never in ontology.jsonl nor in the
    BM25 index built from it (issue 12, item 0)."""
    from kronlink.data.candidates import CandidateIndex
    from kronlink.data.io import ONTOLOGY_FILE, read_ontology

    plant = "zqxcanary" + "71f3"
    obo = tmp_path / "hp.obo"
    obo.write_text(HPO_WITH_CANARY.replace("{plant}", plant))
    task = build_task("hpo", path=obo, k=2, split_rule="mention")
    assert any(plant in q.mention for q in task.queries)
    folder = save_task(task, tmp_path / "task")
    assert plant.encode() not in (folder / ONTOLOGY_FILE).read_bytes()
    assert plant.encode() in (folder / "queries.jsonl").read_bytes()
    index = CandidateIndex(read_ontology(folder / ONTOLOGY_FILE))
    assert index._bm25.get_tokens_ids([plant]) == []  # not in the index's vocabulary
    assert not index.concept_scores(plant).any()


def test_hpo_by_concept_and_determinism():
    task = built("hpo", "concept")
    train = {q.gold for q in task.split("train")}
    assert not train & {q.gold for q in task.split("test")}
    assert not train & {q.gold for q in task.split("dev")}
    again = build_task("hpo", seed=0, split_rule="concept", k=K, limit=LIMIT)
    assert again.queries == task.queries and again.concepts == task.concepts
    assert built("hpo", "concept", seed=1).queries != task.queries


def test_icd10cm_content():
    task = built("icd10cm")
    by_id = {c.id: c for c in task.concepts}
    assert by_id["A00"].name == "Cholera"
    assert by_id["A00.0"].name.startswith("Cholera due to Vibrio cholerae")
    # <includes> notes are searchable synonyms, never queries
    assert any("Salmonella" in s for s in by_id["A02"].synonyms)
    assert "high blood pressure" in by_id["I10"].synonyms
    assert not {q.mention for q in task.queries} & set(by_id["I10"].synonyms)
    assert all(q.left_context == q.right_context == "" for q in task.queries)


def test_hpo_skips_obsolete_terms():
    task = built("hpo")
    assert not any(c.name.startswith("obsolete") for c in task.concepts)
    assert next(c for c in task.concepts if c.id == "HP:0000003").definition.startswith(
        "Multicystic dysplasia"
    )


def test_built_task_round_trips(tmp_path):
    task = built("hpo")
    save_task(task, tmp_path)
    loaded = load_task(tmp_path)
    assert loaded.queries == task.queries and loaded.concepts == task.concepts


def test_registry():
    assert set(BUILDERS) == {"icd10cm", "hpo", "drugs"}
    with pytest.raises(ValueError, match="unknown task"):
        build_task("snomed")


def test_hpo_keeps_the_source_synonyms_that_are_no_query(tmp_path):
    """HPO's stored ontology holds the EXACT/RELATED synonyms that no split
    uses as a query (here: those beyond ``limit``), and none that it does."""
    obo = tmp_path / "hp.obo"
    obo.write_text(HPO_WITH_CANARY.replace(" {plant}", ""))
    task = build_task("hpo", path=obo, k=2, split_rule="mention", limit=3)
    queries = {normalize(q.mention) for q in task.queries}
    assert queries == {"epileptic seizure", "seizures", "fits"}
    stored = {c.id: {normalize(s) for s in c.synonyms} for c in task.concepts}
    assert stored["HP:0001250"] == set()  # all three are queries
    assert stored["HP:0002315"] == {"cephalgia", "head pain"}  # beyond the limit
