"""Text normalisation shared by filtering, splitting and candidate generation."""

from __future__ import annotations

import re

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The form two mentions are compared in: case-folded, whitespace collapsed.

    ``casefold`` rather than ``lower`` so that e.g. German sharp s compares
    equal to "ss", which is how a reader would judge two strings "identical".
    """
    return _SPACE.sub(" ", text).strip().casefold()
