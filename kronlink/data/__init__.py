"""Tasks: their records, files, splits, candidate generation, builders and readers.

See docs/data.md for the formats and rules, DESIGN.md section 2 for why.
"""

from __future__ import annotations

from kronlink.data.builders import BUILDERS, build_hpo, build_icd10cm, build_task
from kronlink.data.candidates import CandidateIndex, attach_candidates, recall_at_k
from kronlink.data.io import (
    DEFAULT_MAX_BYTES,
    load_task,
    read_ontology,
    read_queries,
    save_task,
    write_ontology,
    write_queries,
)
from kronlink.data.readers import read_concept_names, read_medmentions, read_mednorm
from kronlink.data.schema import SPLITS, Candidate, Concept, Query, Task
from kronlink.data.splits import (
    SplitRule,
    assign_split,
    filter_mentions,
    split_by_concept,
    split_by_mention,
    split_queries,
    train_synonyms,
)

__all__ = [
    "BUILDERS",
    "DEFAULT_MAX_BYTES",
    "SPLITS",
    "Candidate",
    "CandidateIndex",
    "Concept",
    "Query",
    "SplitRule",
    "Task",
    "assign_split",
    "attach_candidates",
    "build_hpo",
    "build_icd10cm",
    "build_task",
    "filter_mentions",
    "load_task",
    "read_concept_names",
    "read_medmentions",
    "read_mednorm",
    "read_ontology",
    "read_queries",
    "recall_at_k",
    "save_task",
    "split_by_concept",
    "split_by_mention",
    "split_queries",
    "train_synonyms",
    "write_ontology",
    "write_queries",
]
