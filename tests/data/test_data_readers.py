"""The MedMentions (PubTator) and MedNorm readers, on the sample files in fixtures/."""

from __future__ import annotations

import shutil

import pytest
from data_helpers import FIXTURES, fingerprint

from kronlink.data._text import normalize
from kronlink.data.readers import (
    read_concept_names,
    read_medmentions,
    read_mednorm,
    read_mednorm_rows,
    read_pubtator,
)
from kronlink.data.splits import without_query_strings
from kronlink.errors import DataFormatError

PUBTATOR = FIXTURES / "medmentions_sample.pubtator"
UMLS_NAMES = FIXTURES / "umls_names_sample.tsv"
MEDNORM = FIXTURES / "mednorm_sample.tsv"
MEDDRA_NAMES = FIXTURES / "meddra_names_sample.tsv"


def test_pubtator_documents_and_offsets():
    docs = list(read_pubtator(PUBTATOR))
    assert [d.pmid for d in docs] == ["100", "200", "300"]
    for d in docs:
        for a in d.annotations:
            assert d.text[a.start : a.end] == a.mention
    assert docs[0].annotations[2].cui == "C4308010"  # the UMLS: prefix is dropped


def test_medmentions_task_with_context():
    task = read_medmentions(PUBTATOR, UMLS_NAMES, context_words=3, k=4)
    by_mention = {q.mention: q for q in task.queries}
    q = by_mention["DCTN4"]
    assert (q.left_context, q.right_context) == ("disease. We studied", "variants in adults")
    assert q.gold == "C4308010"
    # names equal to the concept's own name are dropped (DESIGN.md section 2)
    assert {"kidney failure", "Acute kidney injury", "lung disease"}.isdisjoint(by_mention)
    assert task.meta["filter"]["dropped_own_name"] == 4
    assert task.meta["split_rule"] == "document"
    assert all(len(q.candidates) == 4 for q in task.queries)
    assert all(q.gold_index() >= 0 for q in task.split("train"))
    # document split: all mentions of one document share a split
    assert len({q.split for q in task.queries if q.mention in ("DCTN4", "CF")}) == 1
    # The ontology is the names file minus every string used as a query: no corpus
    # mention is copied into it, and a listed synonym that is also a mention
    # ("High blood pressure") is not stored (issue 12, item 0).
    given = read_concept_names(UMLS_NAMES)
    assert list(task.concepts) == without_query_strings(given, task.queries)
    assert "High blood pressure" in next(c for c in given if c.id == "C0020538").synonyms
    assert next(c for c in task.concepts if c.id == "C0020538").synonyms == ()


def test_medmentions_official_split_files():
    task = read_medmentions(
        PUBTATOR, UMLS_NAMES, pmid_splits={"train": ["100", "200"], "test": ["300"]}, k=3
    )
    assert {q.mention for q in task.split("test")} == {"high blood pressure", "type 2 diabetes"}
    train = {normalize(q.mention) for q in task.split("train")}
    assert "high blood pressure" in train  # seen mention, from another document


@pytest.mark.parametrize("rule", ["mention", "concept"])
def test_medmentions_rule_splits(rule):
    task = read_medmentions(PUBTATOR, UMLS_NAMES, split_rule=rule, k=3)
    assert task.meta["split_rule"] == rule
    assert all(q.split in ("train", "dev", "test") for q in task.queries)


def _broken_copy(tmp_path, src, old: str, new: str):
    path = tmp_path / src.name
    text = src.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path, fingerprint(path)


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "words"),
    [
        (
            "100\t149\t161\tlung disease",
            "100\t150\t162\tlung disease",
            4,
            "mention",
            "expected the text at 150:162",
        ),
        ("100\t174\t179\tDCTN4\tT047\t", "100\t174\t179\tDCTN4\t", 5, None, "6 tab-separated"),
        ("100\t28\t60", "100\tx\t60", 3, "start", "integer offsets"),
        ("200\t41\t49", "100\t41\t49", 10, "pmid", "current document"),
        ("200\t85\t99", "200\t85\t9999", 11, "end", "expected 0 <= start < end"),
        ("200|a|", "200|x|", 9, "kind", "'t' (title) or 'a'"),
    ],
    ids=["mention_mismatch", "columns", "offset_type", "pmid", "offset_range", "kind"],
)
def test_pubtator_errors(tmp_path, old, new, line, field, words):
    path, before = _broken_copy(tmp_path, PUBTATOR, old, new)
    with pytest.raises(DataFormatError) as info:
        read_medmentions(path, UMLS_NAMES)
    err = info.value
    assert (err.line, err.field) == (line, field)
    assert str(path) in str(err) and f"line {line}" in str(err) and words in str(err)
    assert fingerprint(path) == before


def test_names_file_errors(tmp_path):
    path, before = _broken_copy(
        tmp_path, UMLS_NAMES, "C4308010\tDCTN4 gene", "C0024115\tDCTN4 gene"
    )
    with pytest.raises(DataFormatError) as info:
        read_concept_names(path)
    assert (info.value.line, info.value.field) == (4, "id")
    assert "first seen on line 3" in str(info.value)
    assert fingerprint(path) == before
    path.write_text("C1\n")
    with pytest.raises(DataFormatError, match="2 or 3 tab-separated"):
        read_concept_names(path)
    path.write_text("# only a comment\n")
    with pytest.raises(DataFormatError, match="empty ontology"):
        read_concept_names(path)


def test_no_known_cui_is_an_error(tmp_path):
    names = tmp_path / "names.tsv"
    names.write_text("C9999999\tSomething else\n")
    with pytest.raises(DataFormatError, match="names file"):
        read_medmentions(PUBTATOR, names)


def test_mednorm_rows_and_target_column():
    queries, dropped = read_mednorm_rows(MEDNORM)
    assert dropped == {"no_target": 1, "ambiguous": 1}
    assert {q.gold for q in queries} == {"10000087", "10022437", "10013573", "10028813"}
    sct, _ = read_mednorm_rows(MEDNORM, target="single_mapped_sct_ids")
    assert "271681002" in {q.gold for q in sct}


def test_mednorm_task():
    task = read_mednorm(MEDNORM, MEDDRA_NAMES, k=3)
    assert task.meta["filter"]["dropped_duplicate"] == 1  # "sore stomach" twice
    assert task.meta["filter"]["dropped_own_name"] == 1  # "nausea"
    assert len(task.queries) == 7
    assert all(len(q.candidates) == 3 for q in task.queries)
    used = {normalize(q.mention) for q in task.queries}  # any split, train too
    synonyms = {normalize(s) for c in task.concepts for s in c.synonyms}
    assert not synonyms & used


def test_mednorm_errors(tmp_path):
    path, before = _broken_copy(tmp_path, MEDNORM, "single_mapped_meddra_codes", "codes")
    with pytest.raises(DataFormatError) as info:
        read_mednorm(path, MEDDRA_NAMES)
    assert (info.value.line, info.value.field) == (1, "single_mapped_meddra_codes")
    assert fingerprint(path) == before
    shutil.copy(MEDNORM, path)
    with path.open("a") as f:
        f.write("CADEC\tX.9\tonly three\n")
    with pytest.raises(DataFormatError) as info:
        read_mednorm(path, MEDDRA_NAMES)
    assert info.value.line == 13 and "expected 8" in str(info.value)
    path.write_bytes(MEDNORM.read_bytes().replace(b"tummy ache", b"tummy \xff"))
    with pytest.raises(DataFormatError, match="invalid UTF-8") as info:
        read_mednorm(path, MEDDRA_NAMES)
    assert info.value.line == 3
