"""Task files: round trips, and every format error with its file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import fingerprint

from kronlink.data.io import (
    load_task,
    read_ontology,
    read_queries,
    save_task,
    write_ontology,
    write_queries,
)
from kronlink.data.schema import Candidate, Concept, Query, Task
from kronlink.errors import DataFormatError

CANDS = [{"id": "C1", "name": "Cystic fibrosis"}, {"id": "C2", "name": "Kidney failure"}]


def q(**over) -> str:
    d = {
        "mention": "CF",
        "left_context": "",
        "right_context": "",
        "candidates": CANDS,
        "gold": "C1",
        "split": "train",
    }
    d.update(over)
    return json.dumps({k: v for k, v in d.items() if v is not ...})


def c(cid: str = "C1", **over) -> str:
    d = {"id": cid, "name": f"name of {cid}", "synonyms": [], "definition": ""}
    d.update(over)
    return json.dumps({k: v for k, v in d.items() if v is not ...})


GOOD_Q = q()

# (case id, which reader, file bytes, expected line, expected field, words in the message)
CASES = [
    ("malformed_json", "queries", f'{GOOD_Q}\n{{"mention": "x",\n', 2, None, "malformed JSON"),
    ("not_an_object", "queries", f"{GOOD_Q}\n[1, 2]\n", 2, None, "expected a JSON object"),
    ("missing_field", "queries", f"{GOOD_Q}\n{q(mention=...)}\n", 2, "mention", "missing"),
    ("ill_typed_field", "queries", f"{q(gold=7)}\n", 1, "gold", "got int"),
    ("ill_typed_context", "queries", f"{q(left_context=None)}\n", 1, "left_context", "got null"),
    (
        "ill_typed_candidate",
        "queries",
        f"{q(candidates=[CANDS[0], {'id': 3, 'name': 'x'}])}\n",
        1,
        "candidates[1].id",
        "got int",
    ),
    ("candidates_not_list", "queries", f"{q(candidates='C1')}\n", 1, "candidates", "got str"),
    (
        "duplicate_candidate",
        "queries",
        f"{q(candidates=[CANDS[0], CANDS[0]])}\n",
        1,
        "candidates[1].id",
        "duplicate",
    ),
    (
        "gold_not_in_candidates",
        "queries",
        f"{GOOD_Q}\n{GOOD_Q}\n{q(gold='C3')}\n",
        3,
        "gold",
        "not among",
    ),
    ("unknown_split", "queries", f"{q(split='validation')}\n", 1, "split", "'validation'"),
    (
        "invalid_utf8",
        "queries",
        GOOD_Q.encode() + b'\n{"mention": "\xff\xfe"}\n',
        2,
        None,
        "invalid UTF-8",
    ),
    ("empty_queries", "queries", "\n\n", None, None, "no queries"),
    ("empty_ontology", "ontology", "", None, None, "empty ontology"),
    (
        "duplicate_concept",
        "ontology",
        f"{c('C1')}\n{c('C2')}\n{c('C1')}\n",
        3,
        "id",
        "first seen on line 1",
    ),
    ("ontology_missing_name", "ontology", f"{c('C1', name=...)}\n", 1, "name", "missing"),
    (
        "ontology_bad_synonym",
        "ontology",
        f"{c('C1', synonyms=['a', 2])}\n",
        1,
        "synonyms[1]",
        "got int",
    ),
    ("ontology_empty_id", "ontology", f"{c('')}\n", 1, "id", "non-empty"),
]


def _write(path: Path, content: str | bytes) -> None:
    path.write_bytes(content.encode() if isinstance(content, str) else content)


@pytest.mark.parametrize(
    ("case", "kind", "content", "line", "field", "words"), CASES, ids=[x[0] for x in CASES]
)
def test_format_error_names_file_line_field_and_changes_nothing(
    tmp_path, case, kind, content, line, field, words
):
    path = tmp_path / f"{kind}.jsonl"
    _write(path, content)
    before = fingerprint(path)
    with pytest.raises(DataFormatError) as info:
        read_queries(path) if kind == "queries" else read_ontology(path)
    err, msg = info.value, str(info.value)
    assert str(path) in msg and err.path == str(path)
    assert err.line == line
    assert err.field == field
    if line is not None:
        assert f"line {line}" in msg
    if field is not None:
        assert repr(field) in msg
    assert words in msg
    assert fingerprint(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_gold_not_in_ontology_when_ids_given(tmp_path):
    path = tmp_path / "queries.jsonl"
    _write(path, f"{q(candidates=...)}\n{q(gold='C9', candidates=...)}\n")
    before = fingerprint(path)
    with pytest.raises(DataFormatError) as info:
        read_queries(path, concept_ids={"C1", "C2"})
    assert (info.value.line, info.value.field) == (2, "gold")
    assert "'C9'" in str(info.value) and str(path) in str(info.value)
    assert fingerprint(path) == before
    assert len(read_queries(path)) == 2  # without the ontology nothing is checked


def test_candidate_not_in_ontology_when_ids_given(tmp_path):
    path = tmp_path / "queries.jsonl"
    _write(path, f"{GOOD_Q}\n")
    with pytest.raises(DataFormatError) as info:
        read_queries(path, concept_ids={"C1"})
    assert (info.value.line, info.value.field) == (1, "candidates[1].id")


def test_oversized_file_refused_before_reading(tmp_path):
    path = tmp_path / "queries.jsonl"
    _write(path, f"{GOOD_Q}\n" * 10)
    before = fingerprint(path)
    with pytest.raises(DataFormatError) as info:
        read_queries(path, max_bytes=100)
    assert "too large" in str(info.value) and str(path) in str(info.value)
    assert "at most 100 bytes" in str(info.value)
    assert fingerprint(path) == before
    with pytest.raises(DataFormatError, match="too large"):
        read_ontology(path, max_bytes=10)


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(DataFormatError, match="not found"):
        read_ontology(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("split", ["dev", "test"])
def test_gold_may_be_absent_from_evaluation_candidates(tmp_path, split):
    # Retrieval misses at evaluation are legitimate: nothing inserts the gold there.
    path = tmp_path / "queries.jsonl"
    _write(path, f"{q(gold='C3', split=split)}\n")
    (query,) = read_queries(path)
    assert query.gold_index() == -1


def test_optional_fields_default(tmp_path):
    path = tmp_path / "queries.jsonl"
    _write(path, '{"mention": "CF", "gold": "C1"}\n\n')
    (query,) = read_queries(path)
    assert query == Query(mention="CF", gold="C1")
    opath = tmp_path / "ontology.jsonl"
    _write(opath, '{"id": "C1", "name": "Cystic fibrosis", "definition": null}\n')
    assert read_ontology(opath) == [Concept("C1", "Cystic fibrosis")]


def _task() -> Task:
    concepts = (Concept("C1", "Cystic fibrosis", ("CF",), "A disease."), Concept("C2", "Asthma"))
    cands = (Candidate("C2", "Asthma"), Candidate("C1", "Cystic fibrosis"))
    queries = (
        Query("mucoviscidosis", "C1", "a", "b", cands, "train"),
        Query("wheezing lungs ü", "C2", "", "", cands, "test"),
        Query("no candidates", "C2", split="dev"),
    )
    return Task("toy", concepts, queries, {"seed": 0})


def test_save_and_load_round_trip(tmp_path):
    task = _task()
    save_task(task, tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "ontology.jsonl",
        "queries.jsonl",
        "task.json",
    ]
    header = json.loads((tmp_path / "t" / "task.json").read_text())
    assert header["sizes"] == {"concepts": 2, "queries": {"train": 1, "dev": 1, "test": 1}}
    loaded = load_task(tmp_path / "t")
    assert loaded.concepts == task.concepts
    assert loaded.queries == task.queries
    assert (loaded.name, loaded.meta) == ("toy", {"seed": 0})


def test_write_then_read_files(tmp_path):
    task = _task()
    write_ontology(tmp_path / "o.jsonl", task.concepts)
    write_queries(tmp_path / "q.jsonl", task.queries)
    assert tuple(read_ontology(tmp_path / "o.jsonl")) == task.concepts
    assert tuple(read_queries(tmp_path / "q.jsonl")) == task.queries


def test_load_refuses_sizes_mismatch(tmp_path):
    save_task(_task(), tmp_path)
    qpath = tmp_path / "queries.jsonl"
    qpath.write_text("\n".join(qpath.read_text().splitlines()[:2]) + "\n")
    before = {p.name: fingerprint(p) for p in tmp_path.iterdir()}
    with pytest.raises(DataFormatError) as info:
        load_task(tmp_path)
    assert info.value.field == "sizes" and "task.json" in str(info.value)
    assert {p.name: fingerprint(p) for p in tmp_path.iterdir()} == before


def test_load_checks_gold_against_ontology(tmp_path):
    save_task(_task(), tmp_path)
    (tmp_path / "ontology.jsonl").write_text(c("C1") + "\n")
    with pytest.raises(DataFormatError) as info:
        load_task(tmp_path)
    assert "queries.jsonl" in str(info.value)
    assert info.value.line == 1


def test_load_refuses_bad_header(tmp_path):
    save_task(_task(), tmp_path)
    (tmp_path / "task.json").write_text('{"format_version": 99, "name": "toy"}')
    with pytest.raises(DataFormatError) as info:
        load_task(tmp_path)
    assert info.value.field == "format_version"
