"""Fixtures of the data tests."""

from __future__ import annotations

import pytest
from data_helpers import small_ontology

from kronlink.data.schema import Concept


@pytest.fixture
def ontology() -> list[Concept]:
    return small_ontology()
