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
# "<condition>, unspecified" ("Depression, unspecified", "Anemia, unspecified")
# or "Unspecified <condition>" ("Unspecified atrial fibrillation"); coding
# guidelines assign it to a plain mention of the condition, so the plain form
# is that name's normalised form too. Two qualified forms say the same (the
# detail a plain mention lacks is the organism or the site): "Pneumonia,
# unspecified organism", "Urinary tract infection, site not specified". Other
# qualified forms stay: ", unspecified eye" still names a laterality code.
_UNSPECIFIED_SUFFIXES = (", unspecified", ", unspecified organism", ", site not specified")
_UNSPECIFIED_PREFIX = "unspecified "
# The ICD-10-CM Official Guidelines' conventions (section I.A), which HPO and
# other clinical vocabularies share in their names and synonyms:
# - parentheses enclose nonessential modifiers, words that may be present or
#   absent without changing the code: "Hypertension (arterial) (benign)";
# - square brackets enclose synonyms, alternative wordings or explanatory
#   phrases: "Acute nasopharyngitis [common cold]" is also "common cold";
# - "NOS", not otherwise specified, marks the plain term: "Stroke NOS".
_PARENS = re.compile(r"\s*\([^()]*\)")
_BRACKET = re.compile(r"\s*\[([^\[\]]*)\]")
_NOS = " nos"


def _plain(key: str) -> str:
    return _SPACE.sub(" ", key).strip(" ,")


def name_keys(name: str) -> set[str]:
    """The normalised forms a mention must equal to match ``name`` exactly.

    :func:`normalize` of it and, following ICD-10-CM's conventions, of it
    without its nonessential modifiers in parentheses, with a bracketed
    alternative wording either left out or taken alone, without a trailing
    "NOS", and without an "unspecified" qualifier (see the comments above).
    """
    key = normalize(name)
    if not key:
        return set()
    keys = {key}
    if _PARENS.search(key):
        keys.add(_plain(_PARENS.sub("", key)))
    for k in list(keys):
        match = _BRACKET.search(k)
        if match:
            keys.update(x for x in (_plain(_BRACKET.sub("", k)), _plain(match.group(1))) if x)
    for k in list(keys):
        if k.endswith(_NOS) and len(k) > len(_NOS):
            keys.add(_plain(k[: -len(_NOS)]))
    for k in list(keys):
        for suffix in _UNSPECIFIED_SUFFIXES:
            if k.endswith(suffix) and len(k) > len(suffix):
                keys.add(_plain(k[: -len(suffix)]))
        if k.startswith(_UNSPECIFIED_PREFIX) and len(k) > len(_UNSPECIFIED_PREFIX):
            keys.add(_plain(k[len(_UNSPECIFIED_PREFIX) :]))
    keys.discard("")
    return keys
