"""Plain factories for the worker tests: tiny synthetic tasks, staging, grep."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

from kronlink.data.io import save_task
from kronlink.data.schema import Candidate, Concept, Query, Task
from kronlink.settings import Settings

NAMES = ["fever", "cough", "asthma", "angina", "anemia", "gout", "rash", "migraine"]
TINY_RANKER = {
    "kind": "cnn",
    "tokenizer": None,
    "embedding_dim": 8,
    "channels": 8,
    "hidden_size": 8,
}
TINY_TRAIN = {
    "epochs": 1,
    "batch_size": 16,
    "lr": 0.003,
    "head_lr": None,
    "seed": 0,
    "device": "cpu",
}


def make_task(name: str, seed: int, plant: str | None = None) -> Task:
    """16 train, 8 dev, 8 test queries over 8 concepts; ``plant`` goes into every
    mention, and into the ontology too: each concept lists "<name> <plant>" as a
    synonym and in its definition, as a source whose mentions are its synonyms
    (HPO, ICD-10-CM) would. The worker must store neither (issue 12, item 0)."""
    rng = random.Random(seed)
    queries = []
    for split, n in (("train", 16), ("dev", 8), ("test", 8)):
        for _ in range(n):
            picked = rng.sample(NAMES, 4)
            gold = rng.choice(picked)
            mention = f"{gold} {plant}" if plant else f"{gold} noted"
            cands = tuple(Candidate(c, c) for c in picked)
            queries.append(Query(mention, gold, "patient has", "today", cands, split))
    if plant:
        concepts = tuple(
            Concept(n, n, synonyms=(f"{n} {plant}",), definition=f"a finding; {n} {plant}")
            for n in NAMES
        )
    else:
        concepts = tuple(Concept(n, n) for n in NAMES)
    return Task(name, concepts, tuple(queries))


# Made-up lay words for plain names: MiniLM cannot know them, so only tuning
# the retriever's query tower links them (tests of retriever_tune).
ALPHA = {
    "Hypertension": "blorp",
    "Asthma": "wheezle",
    "Fever": "hotbod",
    "Cough": "barkle",
    "Headache": "skullache",
    "Migraine": "flashhead",
    "Anemia": "paleblood",
    "Gout": "toefire",
}
BETA = {
    "Nausea": "queaze",
    "Vertigo": "spinnies",
    "Eczema": "itchskin",
    "Insomnia": "nosnooze",
    "Tinnitus": "earhum",
    "Dyspepsia": "gutburn",
    "Syncope": "droopfall",
    "Psoriasis": "scaleflake",
}


def lay_task(name: str, words: dict[str, str], seed: int) -> Task:
    """Each lay word in train, dev and test (the ontology stores none of them)."""
    rng = random.Random(seed)
    ids = {n: f"{name}:{i}" for i, n in enumerate(words)}
    concepts = tuple(Concept(ids[n], n) for n in words)
    queries = []
    for split in ("train", "train", "dev", "test"):
        for n, lay in words.items():
            picked = [*rng.sample([c for c in words if c != n], 3), n]
            cands = tuple(Candidate(ids[c], c) for c in picked)
            queries.append(Query(lay, ids[n], "patient has", "today", cands, split))
    return Task(name, concepts, tuple(queries))


def stage(settings: Settings, task: Task) -> str:
    staged_id = uuid.uuid4().hex
    save_task(task, settings.staging_path / staged_id)
    return staged_id


def unique_plant() -> str:
    return f"zqxplanted{uuid.uuid4().hex}"


def grep_tree(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]
