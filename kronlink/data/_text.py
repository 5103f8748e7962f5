"""Text normalisation shared by filtering, splitting and candidate generation."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

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


# Number-insensitive keys that also read "A of/in/on/at B" as "B A"
# ("kidney stones" is ICD-10-CM's "Stone in kidney", "Fractures of the long
# bones" HPO's "Long-bone fracture"). Word order is otherwise kept: "nausea
# without vomiting" is not "vomiting without nausea", nor "cone-rod" "rod-cone".
# "the" and "an" are dropped; "a" stays ("hepatitis A", "vitamin A").
_LOOSE_DROP = frozenset({"the", "an"})
_SITE = frozenset({"of", "in", "on", "at"})
_WORD = re.compile(r"[^\W_]+")
# Plural endings folded to the singular; "-ss", "-us", "-is", "-as" are
# singular Latin and English forms ("abscess", "bronchus", "pelvis", "pancreas").
_SINGULAR_ENDINGS = ("ss", "us", "is", "as")


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(_SINGULAR_ENDINGS):
        return word[:-1]
    return word


def loose_key(text: str) -> str:
    """``text`` normalised, hyphens as spaces, words singular, "the" and "an"
    left out, and "A <of|in|on|at> B" read as "B A" when that preposition is
    the text's only one: "Stone in kidney" and "kidney stones" both give
    "kidney stone". Other word orders are kept."""
    words = [_singular(w) for w in _WORD.findall(normalize(text)) if w not in _LOOSE_DROP]
    sites = [i for i, w in enumerate(words) if w in _SITE]
    if len(sites) == 1 and 0 < sites[0] < len(words) - 1:
        i = sites[0]
        words = words[i + 1 :] + words[:i]
    return " ".join(words)


def loose_keys(name: str) -> set[str]:
    """:func:`loose_key` of each of ``name``'s :func:`name_keys` (a concept's
    side; a mention is compared by its own :func:`loose_key` alone, since a
    user's parentheses or "NOS" are not the ontology's conventions)."""
    return {k for k in map(loose_key, name_keys(name)) if k}


# An acronym as ontologies write it inside a name or synonym: "Decompensated
# COPD", "HIV disease". Two or more capitals; with a digit ("AML1") it is
# usually a gene or a grade, not an abbreviation of words.
_ACRONYM = re.compile(r"\b([A-Z]{2,})\b")
_CODE_LIKE = re.compile(r"\b(?=\w*[A-Za-z])(?=\w*[0-9])\w+\b")


def acronym_expansions(texts_by_concept: Iterable[Sequence[str]]) -> dict[str, set[str]]:
    """Acronyms the ontology itself spells out: normalised acronym -> the
    normalised long forms.

    A capitalised acronym in one of a concept's texts (its name or synonyms)
    is paired with a run of consecutive words in another of *its* texts whose
    initials spell it, one word a letter (hyphenated words split: "gastro-
    esophageal"): J44.1's "Decompensated COPD" and its name "Chronic
    obstructive pulmonary disease with (acute) exacerbation" give copd ->
    "chronic obstructive pulmonary disease". Nothing outside the ontology is
    used (Schwartz and Hearst's pairing of a short and a long form, across a
    concept's texts instead of within one sentence). Left out, as the
    pairing would be wrong there:

    - a text that also carries a code-like token ("AML M4": the acronym
      names a subtype there, and "AML" is not C92.5's myelomonocytic form);
    - a run holding a capitalised word (HPO's "increased INR" is not "II");
    - a run from another text ending in a word of the acronym's own text
      ("IM myxoma": IM spells intramuscular, not "Intramuscular myxoma"; "GI
      tract" is not "Gastrointestinal infections"). A long form in the
      acronym's own text ("Chronic kidney disease (CKD)") is taken as it is.
    """
    found: dict[str, set[str]] = {}
    for texts in texts_by_concept:
        texts = [t for t in texts if t]
        with_acronym = [(t, _ACRONYM.findall(t)) for t in texts if not _CODE_LIKE.search(t)]
        if not any(acronyms for _, acronyms in with_acronym):
            continue
        runs_from = [_WORD.findall(t.replace("-", " ")) for t in texts]
        for text, acronyms in with_acronym:
            own = {_singular(w.casefold()) for w in _WORD.findall(text.replace("-", " "))}
            for acronym in acronyms:
                letters = acronym.casefold()
                n = len(letters)
                for source, words in zip(texts, runs_from, strict=True):
                    for i in range(len(words) - n + 1):
                        run = words[i : i + n]
                        if (
                            "".join(w[0] for w in run).casefold() == letters
                            and not any(len(w) > 1 and w.isupper() for w in run)
                            and (source == text or _singular(run[-1].casefold()) not in own)
                        ):
                            found.setdefault(letters, set()).add(" ".join(run).casefold())
    return found
