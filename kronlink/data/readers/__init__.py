"""Readers of corpora that users bring (their licences forbid shipping them)."""

from __future__ import annotations

from kronlink.data.readers._names import read_concept_names
from kronlink.data.readers.medmentions import read_medmentions, read_pubtator
from kronlink.data.readers.mednorm import read_mednorm, read_mednorm_rows

__all__ = [
    "read_concept_names",
    "read_medmentions",
    "read_mednorm",
    "read_mednorm_rows",
    "read_pubtator",
]
