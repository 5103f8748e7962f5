"""The retriever's acronym and loose-key matches (Retriever.match): what they
join, and the wrong joins each rule is there to refuse, on made-up concepts
and on the real ICD-10-CM and HPO texts."""

from __future__ import annotations

import pytest

from kronlink.data._text import acronym_expansions, loose_key, loose_keys
from kronlink.data.schema import Concept
from kronlink.retrieval import Retriever


def test_loose_keys_read_a_site_phrase_and_fold_plurals_but_keep_order_and_negation():
    assert loose_key("kidney stones") in loose_keys("Stone in kidney")
    assert loose_key("Fractures of the long bones") == loose_key("Long-bone fracture")
    # Order and negation are meaning: these stay apart.
    assert loose_key("Nausea without vomiting") != loose_key("Vomiting without nausea")
    assert loose_key("Cone-rod dystrophy") != loose_key("Rod-cone dystrophy")
    assert loose_key("hepatitis A") != loose_key("hepatitis")
    # Singular Latin and English forms are not plurals.
    for word in ("abscess", "bronchus", "pelvis", "pancreas"):
        assert loose_key(word) == word
    assert loose_key("allergies") == "allergy"
    # With two site prepositions nothing is moved.
    assert loose_key("Abscess of skin of neck") == "abscess of skin of neck"


def test_acronyms_pair_with_a_long_form_of_the_same_concept_only_where_it_is_one():
    found = acronym_expansions(
        [
            ("Chronic obstructive pulmonary disease with exacerbation", "Decompensated COPD"),
            ("Chronic kidney disease (CKD)",),
            ("Acute myelomonocytic leukemia", "AML M4"),  # a subtype code beside it
            ("Prolonged prothrombin time", "increased INR", "II"),  # INR is no word
            ("Intramuscular myxoma", "IM myxoma"),  # IM spells one word
            ("Recurrent infection of the GI tract", "Gastrointestinal infections"),
        ]
    )
    assert found == {
        "copd": {"chronic obstructive pulmonary disease"},
        "ckd": {"chronic kidney disease"},
    }


def _toy() -> Retriever:
    return Retriever(
        [
            Concept(
                "J44.1",
                "Chronic obstructive pulmonary disease with exacerbation",
                ("Decompensated COPD",),
            ),
            Concept("J44.9", "Chronic obstructive pulmonary disease, unspecified"),
            Concept("N20.0", "Calculus of kidney", ("Stone in kidney",)),
            Concept("Q1", "Left to right shunt"),
            Concept("Q2", "Right to left shunt"),
            Concept("R11.11", "Vomiting without nausea"),
        ]
    )


def test_match_kinds_in_order_and_what_they_refuse():
    r = _toy()
    ids = lambda m: [r.ids[i] for i in r.match(m)[1]]  # noqa: E731
    assert r.match("Chronic obstructive pulmonary disease")[0] == "exact"
    assert (r.match("COPD")[0], ids("COPD")) == ("acronym", ["J44.9"])
    assert ids("copd") == ["J44.9"]  # no word of the ontology's: lower case is fine
    assert r.match("kidney stones") == ("loose", [2])
    # Word order is meaning: "left to right" and "right to left" are read as
    # written, and neither matches the other's loose key.
    assert ids("Right to left shunt") == ["Q2"]
    assert r.match("nausea without vomiting") == ("", [])
    # The variants can be turned off: exact names alone.
    plain = Retriever(r.concepts, variants=False)
    assert plain.match("COPD") == ("", []) and plain.match("kidney stones") == ("", [])
    # And what match finds comes first in the search, as exact names do.
    assert r.search(["COPD"], 3)[0][0] == ("J44.9", float("inf"))


def test_an_acronym_spelled_like_an_ontology_word_needs_capitals():
    r = Retriever(
        [
            Concept("D1", "Heparin induced thrombocytopenia (HIT)"),
            Concept("W1", "Struck or hit by a falling object"),
        ]
    )
    assert r.match("HIT") == ("acronym", [0])
    assert r.match("hit") == ("", [])


def test_a_loose_key_two_concepts_share_matches_neither():
    r = Retriever(
        [
            Concept("A", "Stones in kidney"),
            Concept("B", "Kidney stone disease of"),
            Concept("C", "Kidney stone"),
        ]
    )
    # "kidney stone" is C's exact name; "stone kidneys" loosely is A's and C's.
    assert r.match("kidney stone") == ("exact", [2])
    assert r.match("stone kidneys")[0] == ""


@pytest.mark.slow
def test_real_ontologies_join_copd_and_kidney_stones_and_refuse_the_pitfalls():
    from kronlink.data.builders.hpo import hpo_obo_path, parse_hpo
    from kronlink.data.builders.icd10cm import icd10cm_tabular_path, parse_icd10cm

    icd = Retriever(parse_icd10cm(icd10cm_tabular_path())[0])
    first = lambda r, m: [r.ids[i] for i in r.match(m)[1]]  # noqa: E731
    assert icd.match("COPD")[0] == "acronym" and first(icd, "COPD") == ["J44.9"]
    assert first(icd, "CKD") == ["N18", "N18.9"]
    assert icd.match("kidney stones")[0] == "loose"
    assert first(icd, "kidney stones") == ["N20.0"]
    assert first(icd, "AML") == []  # only "AML M4" and the like: a subtype, left out
    hpo = Retriever(parse_hpo(hpo_obo_path())[0])
    assert first(hpo, "renal cysts") == first(hpo, "Renal cyst") == ["HP:0000107"]
    assert first(hpo, "Cone rod dystrophy") != first(hpo, "Rod-cone dystrophy")
