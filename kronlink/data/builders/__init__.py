"""Builders of the real tasks that need no download: data shipped in PyPI packages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kronlink.data.builders.drugs import build_drugs
from kronlink.data.builders.hpo import build_hpo
from kronlink.data.builders.icd10cm import build_icd10cm
from kronlink.data.schema import Task

__all__ = ["BUILDERS", "build_drugs", "build_hpo", "build_icd10cm", "build_task"]

BUILDERS: dict[str, Callable[..., Task]] = {
    "icd10cm": build_icd10cm,
    "hpo": build_hpo,
    "drugs": build_drugs,
}


def build_task(name: str, **kw: Any) -> Task:
    """Build the task called ``name`` (a key of ``BUILDERS``) with the builder's options."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}: expected one of {sorted(BUILDERS)}") from None
    return builder(**kw)
