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


# ICD-10-CM names the code for a condition stated without further detail
# "<condition>, unspecified" ("Depression, unspecified", "Anemia, unspecified");
# coding guidelines assign it to a plain mention of the condition, so the
# plain form is that name's normalised form too. Only this exact suffix:
# ", unspecified site" or ", unspecified eye" still say which site was meant.
_UNSPECIFIED = ", unspecified"


def name_keys(name: str) -> set[str]:
    """The normalised forms a mention must equal to match ``name`` exactly:
    :func:`normalize` of it, and of it without a trailing ", unspecified"."""
    key = normalize(name)
    keys = {key} if key else set()
    if key.endswith(_UNSPECIFIED) and len(key) > len(_UNSPECIFIED):
        keys.add(key[: -len(_UNSPECIFIED)].rstrip())
    return keys
