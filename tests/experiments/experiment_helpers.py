"""Tiny tasks and configs for the harness tests (a uniquely named module:
test folders here have no ``__init__``)."""

from __future__ import annotations

import random
from pathlib import Path

from kronlink.data.builders._assemble import assemble_task
from kronlink.data.io import save_task
from kronlink.data.schema import Concept, Query

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "su", "da", "fo"]


def tiny_task(name: str, seed: int, n_concepts: int = 16, per_concept: int = 4) -> object:
    """Concepts named by made-up words; mentions are a name's words with one
    word swapped for a per-concept alias, so a ranker can learn the link."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(3))

    concepts, mentions = [], []
    for c in range(n_concepts):
        words = [word() for _ in range(3)]
        aliases = [word() for _ in range(per_concept)]
        cid = f"{name.upper()}:{c}"
        concepts.append(Concept(cid, " ".join(words)))
        for i, alias in enumerate(aliases):
            w = list(words)
            w[i % 3] = alias
            mentions.append(Query(mention=" ".join(w), gold=cid))
    return assemble_task(
        name, concepts, mentions, seed=0, split_rule="mention", k=4, meta={"tiny": True}
    )


def write_tiny_tasks(root: Path, names: tuple[str, ...] = ("alpha", "beta", "gamma")) -> None:
    for i, name in enumerate(names):
        save_task(tiny_task(name, seed=i), root / name)


TINY_CONFIG = """
name = "tiny"
results = "{results}"
seeds = [0]
device = "cpu"

[tasks]
names = ["alpha", "beta", "gamma"]
dirs = {{ alpha = "{tasks}/alpha", beta = "{tasks}/beta", gamma = "{tasks}/gamma" }}

[curvature]
batch_size = 16

[selection]
grid = [0.1, 10.0]

[rankers.cnn]
kind = "cnn"
model = {{ tokenizer = "none", embedding_dim = 8, channels = 8, hidden_size = 8, dropout = 0.0, max_query_length = 24, max_name_length = 12 }}
train = {{ epochs = {epochs}, batch_size = 8, lr = 3e-3, head_lr = 3e-3 }}
tiers = ["tier1", "combined", "tier2", "tier3", "early"]

[tier2]
methods = ["none", "ewc", "kfc", "ekfac"]

[tier3]
methods = ["none", "kfc"]
orderings = [["alpha", "beta", "gamma"], ["gamma", "alpha", "beta"]]

[early]
ordering = ["alpha", "beta"]
fraction = 0.5
methods = ["none", "lrc", "replay", "l2", "ewc", "kfc"]
replay_size = 8
replay_per_batch = 2

[figure2]
task = "alpha"
queries = 20
epochs = 1
embedding_dim = 8
channels = 8
hidden_size = 8
"""


def tiny_config(tmp: Path, epochs: int = 1) -> Path:
    tasks = tmp / "tasks"
    if not tasks.exists():
        write_tiny_tasks(tasks)
    path = tmp / "tiny.toml"
    path.write_text(
        TINY_CONFIG.format(results=tmp / "results", tasks=tasks, epochs=epochs), encoding="utf-8"
    )
    return path
