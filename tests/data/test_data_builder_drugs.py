"""The drug task builder: ids, grouping and the refusal of a code-carrying
pickle on a made-up dictionary; the real packaged file on a small sample."""

from __future__ import annotations

import bz2
import pickle
from functools import cache
from pathlib import Path

import pytest

from kronlink.cli import main
from kronlink.data._text import normalize
from kronlink.data.builders import build_task
from kronlink.data.builders.drugs import parse_drugs
from kronlink.data.io import load_task
from kronlink.data.schema import Task
from kronlink.errors import DataFormatError

SAMPLE = {
    "drug_variant_to_canonical": {
        "zytiga": ["abiraterone"],  # brand name, listed before the drug's own names
        "abiraterone": ["abiraterone"],  # its own name: dropped by the filter
        "abiraterone acetate": ["abiraterone"],
        "stavudin": ["stavudine"],
        "zerit": ["stavudine"],
        "cysteamine hcl": ["cysteamine"],
        "shared name": ["stavudine", "cysteamine"],  # names two drugs: ambiguous
        "menadione sodium": ["menadione"],  # a drug without a record
    },
    "drug_canonical_to_data": {
        "abiraterone": {"name": "Abiraterone", "drugbank_id": "DB05812", "mesh_id": "D000069501"},
        "stavudine": {"name": "Stavudine", "mesh_id": "D018119"},
        "cysteamine": {"name": "Cysteamine", "mesh_id": "D003543"},
        "cysteamine bitartrate": {"name": "Cysteamine bitartrate", "mesh_id": "D003543"},
    },
    "drug_variant_to_variant_data": {},
}


def _write(path: Path, obj: object) -> Path:
    with bz2.open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def test_ids_names_and_mentions(tmp_path) -> None:
    concepts, mentions = parse_drugs(_write(tmp_path / "d.pkl.bz2", SAMPLE))
    by_name = {c.name: c.id for c in concepts}
    # DrugBank id first; a MeSH id only where one drug has it; else the key.
    assert by_name == {
        "Abiraterone": "DB05812",
        "Stavudine": "D018119",
        "Cysteamine": "drugner:cysteamine",
        "Cysteamine bitartrate": "drugner:cysteamine bitartrate",
        "menadione": "drugner:menadione",
    }
    # Grouped by drug in record order, whatever the variant table's order.
    assert [(m.mention, m.gold) for m in mentions[:3]] == [
        ("zytiga", "DB05812"),
        ("abiraterone", "DB05812"),
        ("abiraterone acetate", "DB05812"),
    ]
    task = build_task("drugs", path=tmp_path / "d.pkl.bz2", k=3)
    kept = {normalize(q.mention) for q in task.queries}
    assert "abiraterone" not in kept and "shared name" not in kept
    assert task.meta["filter"]["dropped_own_name"] == 1
    assert task.meta["filter"]["dropped_ambiguous"] == 2
    assert "zytiga" in kept and "menadione sodium" in kept


class _Boom:
    def __reduce__(self):
        return (print, ("pickle ran code",))


def test_a_pickle_with_code_is_refused(tmp_path, capsys) -> None:
    bad = {**SAMPLE, "drug_canonical_to_data": {"x": _Boom()}}
    with pytest.raises(DataFormatError, match="refused global"):
        parse_drugs(_write(tmp_path / "bad.pkl.bz2", bad))
    assert "pickle ran code" not in capsys.readouterr().out
    with pytest.raises(DataFormatError, match="drug_variant_to_canonical"):
        parse_drugs(
            _write(tmp_path / "shape.pkl.bz2", {**SAMPLE, "drug_variant_to_canonical": {"a": "b"}})
        )
    (tmp_path / "junk.pkl.bz2").write_bytes(b"not bz2")
    with pytest.raises(DataFormatError, match=r"junk\.pkl\.bz2"):
        parse_drugs(tmp_path / "junk.pkl.bz2")


@cache
def _real() -> Task:
    return build_task("drugs", seed=0, k=10, limit=400)


def test_real_dictionary_sample() -> None:
    task = _real()
    assert len(task.concepts) > 20000  # the ontology is never cut by limit
    assert len({c.id for c in task.concepts}) == len(task.concepts)
    assert {q.split for q in task.queries} == {"train", "dev", "test"}
    names = {normalize(c.name) for c in task.concepts}
    for q in task.queries:
        assert len(q.candidates) == 10 and normalize(q.mention) not in names
    synonyms = {normalize(s) for c in task.concepts for s in c.synonyms}
    assert not synonyms & {normalize(q.mention) for q in task.queries}  # any split
    by_id = {c.id: c.name for c in task.concepts}
    assert by_id["DB00316"] == "Acetaminophen"


def test_build_tasks_command(tmp_path, capsys) -> None:
    assert (
        main(
            [
                "build-tasks",
                "--out",
                str(tmp_path),
                "--tasks",
                "drugs",
                "--limit",
                "200",
                "--candidates",
                "5",
            ]
        )
        == 0
    )
    loaded = load_task(tmp_path / "drugs")
    assert loaded.name == "drugs" and len(loaded.queries) > 100
