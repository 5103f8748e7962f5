"""The drug task, built offline from the drug dictionary that the
``drug-named-entity-recognition`` package ships (``drug_ner_dictionary.pkl.bz2``,
MIT licence; read here directly, the package itself is never imported: its
import reads and writes a cache file in the home folder).

The dictionary (Fast Data Science, 2025) merges drug and chemical names from
MeSH's Chemicals and Drugs tree, DrugBank, MedlinePlus, Wikipedia and the NHS:
about 20,000 canonical drugs and 107,000 name variants (brand names,
international non-proprietary names in other languages, systematic names,
inverted MeSH entry terms), each variant mapped to one canonical drug.

- Concepts: every canonical drug. Id = its DrugBank id (``DB01048``), else its
  MeSH id when no other canonical shares it (``D000082082``), else
  ``drugner:<canonical key>``, so ids are unique and stable across releases
  where the sources are. Name = the record's ``name`` (the key when absent).
  Definition = empty: the file has no gloss, and structure strings (SMILES)
  are not text a linker reads.
- Mentions: every variant, gold = its canonical drug; a variant that names
  its own drug is dropped by the shared filter (``own_name``), one that maps
  to several is dropped as ``ambiguous``. Context is empty (no running text).
- Leakage: the variants *are* the synonyms, so the stored ontology keeps as
  synonyms only the train mentions (DESIGN.md section 2), as for HPO.

Why a fair third task: another source (drug and chemical vocabularies, not
CMS/NCHS's classification nor the Monarch phenotype ontology), another domain
(substances and brands rather than diagnoses or phenotypes, with their own
morphology: "-mab", "-vir", salt forms, brand names), the same shape (a
surface form linked to a concept of a 20k-concept ontology) and the same
split, filter and candidate rules, so tiers 1 to 3 compare like with like.

The file is a pickle of plain dicts, lists and strings. It is read with an
unpickler that refuses every global, so a tampered file cannot run code: it
raises ``DataFormatError`` instead.
"""

from __future__ import annotations

import bz2
import pickle
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kronlink.data.builders._assemble import assemble_task
from kronlink.data.builders._packages import package_folder
from kronlink.data.schema import Concept, Query, Task
from kronlink.errors import DataFormatError

__all__ = ["build_drugs", "drug_dictionary_path", "parse_drugs", "read_drug_dictionary"]

PACKAGE = "drug_named_entity_recognition"
FILE = "drug_ner_dictionary.pkl.bz2"


def drug_dictionary_path() -> Path:
    """``drug_ner_dictionary.pkl.bz2`` inside the installed package."""
    path = package_folder(PACKAGE) / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall drug-named-entity-recognition")
    return path


class _PlainUnpickler(pickle.Unpickler):
    """Builds only pickle's built-in containers and scalars; any class or
    function reference (the way a pickle runs code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused global {module}.{name}: expected plain data")


def read_drug_dictionary(path: str | Path) -> dict[str, Any]:
    """The dictionary's three tables, checked for the shape the builder reads."""
    path = Path(path)
    try:
        with bz2.open(path, "rb") as f:
            data = _PlainUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise DataFormatError(
            f"expected a bz2-compressed pickle of plain dicts, got: {exc}", path=path
        ) from exc
    if not isinstance(data, dict):
        raise DataFormatError(f"expected a dict at the top, got {type(data).__name__}", path=path)
    for key in ("drug_variant_to_canonical", "drug_canonical_to_data"):
        if not isinstance(data.get(key), dict):
            got = type(data.get(key)).__name__
            raise DataFormatError(f"expected a dict, got {got}", path=path, field=key)
    for variant, canonicals in data["drug_variant_to_canonical"].items():
        if not isinstance(variant, str) or not (
            isinstance(canonicals, list) and all(isinstance(c, str) for c in canonicals)
        ):
            raise DataFormatError(
                f"expected a string mapped to a list of strings, got {variant!r}: {canonicals!r}",
                path=path,
                field="drug_variant_to_canonical",
            )
    for key, record in data["drug_canonical_to_data"].items():
        if not isinstance(key, str) or not isinstance(record, dict):
            raise DataFormatError(
                f"expected a string mapped to a dict, got {key!r}: {type(record).__name__}",
                path=path,
                field="drug_canonical_to_data",
            )
    return data


def _concept_ids(keys: list[str], records: Mapping[str, dict]) -> dict[str, str]:
    mesh_users = Counter(r.get("mesh_id") for r in records.values() if r.get("mesh_id"))
    ids: dict[str, str] = {}
    for key in keys:
        record = records.get(key, {})
        drugbank, mesh = record.get("drugbank_id"), record.get("mesh_id")
        if isinstance(drugbank, str) and drugbank:
            ids[key] = drugbank
        elif isinstance(mesh, str) and mesh and mesh_users[mesh] == 1:
            ids[key] = mesh
        else:
            ids[key] = f"drugner:{key}"
    return ids


def parse_drugs(path: str | Path) -> tuple[list[Concept], list[Query]]:
    """Concepts (without synonyms) and unsplit variant mentions, grouped by
    drug in the file's order of drugs."""
    data = read_drug_dictionary(path)
    records: dict[str, dict] = data["drug_canonical_to_data"]
    variants: dict[str, list[str]] = data["drug_variant_to_canonical"]
    # Canonicals named by a variant but without a record still are drugs.
    keys = list(records)
    known = set(keys)
    for canonicals in variants.values():
        for c in canonicals:
            if c not in known:
                known.add(c)
                keys.append(c)
    ids = _concept_ids(keys, records)
    if len(set(ids.values())) != len(ids):
        dup = next(i for i, n in Counter(ids.values()).items() if n > 1)
        raise DataFormatError(f"two canonical drugs share the id {dup!r}", path=path, field="id")
    concepts = []
    for key in keys:
        name = records.get(key, {}).get("name")
        concepts.append(Concept(id=ids[key], name=name if isinstance(name, str) and name else key))
    # Grouped by drug in the order of the drug records (alphabetical), not in
    # the variant table's order, which lists one source after another (brand
    # names first): so the first ``limit`` mentions are every name of the
    # first drugs, a sample of the whole vocabulary's kinds of names.
    by_drug: dict[str, list[str]] = {key: [] for key in keys}
    for variant, canonicals in variants.items():
        if variant.strip():
            for c in canonicals:
                by_drug[c].append(variant)
    mentions = [Query(mention=v, gold=ids[key]) for key in keys for v in by_drug[key]]
    return concepts, mentions


def build_drugs(
    seed: int = 0,
    split_rule: str = "mention",
    k: int = 25,
    limit: int | None = None,
    *,
    path: str | Path | None = None,
) -> Task:
    """Build the drug task (see the module docstring for what it contains).

    ``limit`` keeps the first ``limit`` variant mentions (before filtering),
    for quick runs; the ontology is always complete.
    """
    started = time.perf_counter()
    source = Path(path) if path is not None else drug_dictionary_path()
    concepts, mentions = parse_drugs(source)
    if limit is not None:
        mentions = mentions[:limit]
    task = assemble_task(
        "drugs",
        concepts,
        mentions,
        seed=seed,
        split_rule=split_rule,
        k=k,
        meta={"source": source.name, "raw_mentions": len(mentions), "limit": limit},
    )
    task.meta["build_seconds"] = round(time.perf_counter() - started, 3)
    return task
