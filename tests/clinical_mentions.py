"""Common clinical and lay mentions with the answers a clinician would accept
(issue 12, "Clinical list"). An accepted code ending in "*" accepts the code
and every code below it (ICD-10-CM's hierarchy is spelled in the code).

ICD-10-CM answers are the code a coder assigns to the plain mention: the
category or its unspecified code ("heart attack": I21 or I21.9), never a
subcode that adds what the mention does not say ("type 2 diabetes" is not
"E11.1 Type 2 diabetes mellitus with ketoacidosis"; until 2026-12 the list
accepted every subcode, "E11*", and counted that answer right).

HPO answers are exact terms; where a parent term is as right as the child
(e.g. "Seizure" for "fits") only the term a clinician would pick is listed.
"""

from __future__ import annotations

ICD10CM: dict[str, tuple[str, ...]] = {
    "high blood pressure": ("I10",),
    "hypertension": ("I10",),
    "heart attack": ("I21", "I21.9"),
    "type 2 diabetes": ("E11", "E11.9"),
    "asthma": ("J45", "J45.9", "J45.90", "J45.909"),
    "stroke": ("I63", "I63.9"),
    "pneumonia": ("J18", "J18.9"),
    "urinary tract infection": ("N39.0",),
    "migraine": ("G43", "G43.9", "G43.90", "G43.909"),
    "flu": ("J11", "J11.1"),
    "common cold": ("J00",),
    "acid reflux": ("K21", "K21.9"),
    "chest pain": ("R07.9", "R07.89"),
    "headache": ("R51", "R51.9"),
    "low back pain": ("M54.5", "M54.50"),
    "depression": ("F32.A", "F32.9"),
    "anxiety": ("F41.9",),
    "kidney stones": ("N20", "N20.0"),
    "appendicitis": ("K37", "K35", "K35.80"),
    "high cholesterol": ("E78.0", "E78.00", "E78.5"),
    "obesity": ("E66", "E66.9"),
    "gout": ("M10", "M10.9"),
    "sore throat": ("J02", "J02.9"),
    "fever": ("R50", "R50.9"),
    "anemia": ("D64.9",),
    "COPD": ("J44", "J44.9"),
    "atrial fibrillation": ("I48", "I48.91"),
}

HPO: dict[str, tuple[str, ...]] = {
    "seizure": ("HP:0001250",),
    "fits": ("HP:0001250",),
    "high blood pressure": ("HP:0000822",),
    "fever": ("HP:0001945",),
    "headache": ("HP:0002315",),
    "short stature": ("HP:0004322",),
    "scoliosis": ("HP:0002650",),
    "asthma": ("HP:0002099",),
    "hearing loss": ("HP:0000365",),
    "intellectual disability": ("HP:0001249",),
    "obesity": ("HP:0001513",),
    "diarrhea": ("HP:0002014",),
    "constipation": ("HP:0002019",),
    "vomiting": ("HP:0002013",),
    "nausea": ("HP:0002018",),
    "cough": ("HP:0012735",),
    "anemia": ("HP:0001903",),
    "hypothyroidism": ("HP:0000821",),
    "muscle weakness": ("HP:0001324",),
    "joint pain": ("HP:0002829",),
    "shortness of breath": ("HP:0002094",),
    "hair loss": ("HP:0001596",),
    "fatigue": ("HP:0012378",),
    "tremor": ("HP:0001337",),
    "low blood sugar": ("HP:0001943",),
    "itching": ("HP:0000989",),
    "nosebleed": ("HP:0000421",),
}

LISTS = {"icd10cm": ICD10CM, "hpo": HPO}


def accepted(answer: str, codes: tuple[str, ...]) -> bool:
    """Whether ``answer`` is one of ``codes`` (a trailing "*" accepts subcodes)."""
    return any(answer.startswith(c[:-1]) if c.endswith("*") else answer == c for c in codes)
