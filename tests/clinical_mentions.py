"""Common clinical and lay mentions with the answers a clinician would accept
(issue 12, "Clinical list"). An accepted code ending in "*" accepts the code
and every code below it (ICD-10-CM's hierarchy is spelled in the code):
"heart attack" is any acute myocardial infarction, I21 and its subcodes.

HPO answers are exact terms; where a parent term is as right as the child
(e.g. "Seizure" for "fits") only the term a clinician would pick is listed.
"""

from __future__ import annotations

ICD10CM: dict[str, tuple[str, ...]] = {
    "high blood pressure": ("I10",),
    "hypertension": ("I10",),
    "heart attack": ("I21*",),
    "type 2 diabetes": ("E11*",),
    "asthma": ("J45*",),
    "stroke": ("I63*",),
    "pneumonia": ("J18*",),
    "urinary tract infection": ("N39.0",),
    "migraine": ("G43*",),
    "flu": ("J09*", "J10*", "J11*"),
    "common cold": ("J00",),
    "acid reflux": ("K21*",),
    "chest pain": ("R07.9", "R07.8*", "R07.1", "R07.2"),
    "headache": ("R51*", "G44.209"),
    "low back pain": ("M54.5*",),
    "depression": ("F32*", "F33*"),
    "anxiety": ("F41*",),
    "kidney stones": ("N20*",),
    "appendicitis": ("K35*", "K37"),
    "high cholesterol": ("E78.0*", "E78.5"),
    "obesity": ("E66*",),
    "gout": ("M10*", "M1A*"),
    "sore throat": ("J02*",),
    "fever": ("R50*",),
    "anemia": ("D64.9", "D50*"),
    "COPD": ("J44*",),
    "atrial fibrillation": ("I48*",),
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
